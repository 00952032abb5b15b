"""Fleet membership and peer discovery."""
