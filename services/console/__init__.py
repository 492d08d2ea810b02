"""The web console: server-rendered pages (Jinja2 + htmx, uPlot for curves) over the services'
gRPC contracts, called with the caller's API key. Served by the gateway under `/console` and
alone by `tlm serve console`. See the README's "Web console" section."""
