"""pyservd: the daemon that serves PyServ applications (process model and operations)."""
