"""``tunepipe serve``: a local REST API in the shape of Vertex AI's, above ``pipelines/``.

The same clients that call Vertex AI (the google-cloud-aiplatform SDK, curl with the seeds'
request bodies) call this server instead when pointed at it: pipeline jobs run through the KFP
local runner, Gemini tuning jobs through the same components, models come from the local
registry, predictions from the local endpoints.
"""
