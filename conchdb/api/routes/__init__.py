"""The API's routers, one per concern: searches, images and slides, system, the web page."""
