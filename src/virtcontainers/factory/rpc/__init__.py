"""The VM cache server's gRPC service: `cache.proto`, its generated code (`cache_pb2*`, made
by scripts/gen-proto.sh) and the server and client around it. Imported only by what serves
or reaches the cache: grpc and protobuf cost more to load than the rest of the factory."""
