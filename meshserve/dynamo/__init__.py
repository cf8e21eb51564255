"""meshserve as an NVIDIA Dynamo backend (`python -m meshserve.dynamo.worker`)."""
