"""The HTTP side: the FastAPI app, its routes, request parsing and the lingering close; thin on
top of the core, which it calls with parsed inputs and whose results it shapes into JSON."""
