"""Pipeline definitions (DAGs only) and the `tunepipe` command."""
