"""The content-addressed foundation of `loraforge run` jobs: IPFS CIDs, CAR export and a local store."""
