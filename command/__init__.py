"""The ``tunepipe`` command, the top layer: it calls the service, the pipelines and the
components, and nothing imports it."""
