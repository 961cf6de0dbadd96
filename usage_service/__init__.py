"""usage-service: answers new-api's GET /api/usage/token from the gateway's database, cached."""

__version__ = "0.1.0"
