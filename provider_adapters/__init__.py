"""gpufleet.provider_adapters: thin facades over the cloud SDKs and the Kubernetes client."""
