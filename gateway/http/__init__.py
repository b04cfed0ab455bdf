"""The HTTP layer: the ASGI app, the endpoints, admin, auth and admission."""
