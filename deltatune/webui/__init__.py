"""`deltatune webui`: fine-tune, watch, chat, evaluate and export from a browser (Gradio).

The page never trains or exports by itself: every action is a `deltatune ...` command line, shown
to the user before it runs (copyable), and run as a subprocess from an argv list (no shell).
Only the chat tab holds a model in the page's process, so that adapters switch without reloading
the base. `runs.py` builds the command lines and reads run folders; `chat.py` streams answers;
`app.py` is the page.
"""
