"""kubellm.operator: reconciles ModelDeployment and ApiKey resources into router config."""
