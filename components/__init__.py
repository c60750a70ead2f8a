"""tunepipe's reusable pipeline components: one subpackage per component, shared code in common."""
