"""Authentication: RS256 bearer tokens verified against rotating keys (PEM or JWKS),
development keys and tokens, and the access level each route declares."""
