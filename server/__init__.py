"""`vmr serve`: a local web page and JSON API to search an index, watch the moments, and label them.

app.py (routes, limits, errors) -> access.py (Host check, access tokens), state.py (the loaded engine, video
catalogue, recent searches, DuckDB locking) and media.py (which files may be served, thumbnails); labels are stored
by store/labels.py; the page is server/static (no build step).
"""
