"""Function nodes for workflow DAGs (torch-workflow-archiver packs this file into each .war).

The intent pipeline's nodes are both models: text-embedder's answer ({"embedding": [...]})
is exactly a body intent-classifier accepts, so no glue function is needed between them.
A workflow that needs glue defines it here as ``def name(data, context) -> list`` and names
it as a node in its manifest steps.
"""
