"""lenskit's Streamlit app: ``streamlit run app.py``.

This file only sets the page up and routes to the pages in ``pages/``; every page
wires widgets to library calls through ``lenskit_app`` (``loaders``, ``widgets``, ``jobs``)
and keeps its choices under the session keys of ``lenskit_app.state``.
"""

import streamlit as st

import lenskit_app.state as S

st.set_page_config(page_title="lenskit", page_icon="🔎", layout="wide")
S.init_state()
st.navigation(
    [
        st.Page("pages/home.py", title="Home", icon="🏠", default=True),
        st.Page("pages/trajectory.py", title="Trajectory", icon="📈"),
        st.Page("pages/compare.py", title="Compare", icon="⚖️"),
        st.Page("pages/evaluate.py", title="Evaluate", icon="📊"),
        st.Page("pages/train.py", title="Train", icon="🏋️"),
        st.Page("pages/causal_basis.py", title="Causal basis", icon="🧭"),
    ],
    position="top",  # the pages get the window's full width for their figures
).run()
