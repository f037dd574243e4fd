"""The Gradio demo and its generation backends."""
