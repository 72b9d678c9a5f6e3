"""The Streamlit app's own modules: cached loaders and session keys, and folder limits.

Only the app (``app.py``, ``pages/``) imports this package; the library never does.
"""
