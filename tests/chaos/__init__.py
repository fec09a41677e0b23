"""The chaos tier: generated bad manifests, hostile trainer output and reports, killed trainers."""
