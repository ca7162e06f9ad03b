"""The operator console (Textual). Imports only the wire schemas and a TwinLink."""
