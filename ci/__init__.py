"""CI helpers for the deployment files (run by ci/validate-deploy.sh; imported by tests)."""
