"""Every boto3 client and call: credential errors mapped once, the network preflight, EC2 console output."""
