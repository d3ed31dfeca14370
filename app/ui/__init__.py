"""The operator's pages: the live page at / and its JSON (GET /v1/live); app/ui/pages.py installs them."""
