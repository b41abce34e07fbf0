"""Sphinx configuration: API pages from docstrings, tutorials included as source."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "curvopt"
author = "curvopt developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
html_theme = "alabaster"
exclude_patterns = ["_build"]
nitpicky = False
