"""txgateway's trial test suite."""

import os

# grpcio (used by the gRPC tests) installs fork handlers that can abort
# processes the suite spawns later (twistd gateways, redis-server) with
# SIGABRT.  The suite never forks a process that keeps using grpc, so turn
# them off before any test module imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
