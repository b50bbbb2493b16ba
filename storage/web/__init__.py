"""The HTTP layer: the app factory and its cleanup contexts, the route table, the views,
the middlewares, HTTP helpers (ranges, validators, digests, tus headers, upload bodies,
parser errors) and the OpenAPI document.  Views parse and answer; the work is the domain's."""
