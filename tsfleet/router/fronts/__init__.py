"""The router's listeners: REST and gRPC inference (both calling the one policy), health and the
admin API. They turn wire events into policy calls and policy answers into wire bytes."""
