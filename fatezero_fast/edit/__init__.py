"""Editing: the pipeline (inversion + edits), the saved Inversion, the controller for your own loop."""
