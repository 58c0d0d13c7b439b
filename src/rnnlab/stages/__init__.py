"""One module per DVC stage; ``pipeline/<stage>.py`` only parses the paths and calls it."""
