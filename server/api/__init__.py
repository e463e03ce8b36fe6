"""The gRPC edge: the server process, the servicer, the one table of per-RPC rules,
the interceptor, access control, TLS and the audit trail."""
