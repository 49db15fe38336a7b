"""A FastAPI service over tiu-core (``make serve``); see README.md beside this file."""
