"""Helpers of the Gradio playground (app.py): model resolution, the chat service, the UI."""
