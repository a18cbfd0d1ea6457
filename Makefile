# tvixfarm: see README.md. Every target works on a fresh Debian machine once
# .ci/run (or `make deps`) has installed the system packages.

GO        ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
BIN       := $(CURDIR)/bin
PROTOC_GEN_GO_VERSION      := v1.36.11
PROTOC_GEN_GO_GRPC_VERSION := v1.6.1
PROTOS    := $(shell find proto -name '*.proto')
DATA      ?= $(CURDIR)/.demo-data

# The executor embeds runc's libcontainer: it needs cgo and libseccomp, and
# the binary must be static, because its first program in every sandbox is
# itself, run in a root file system that has no dynamic loader.
export CGO_ENABLED := 1
export GOFLAGS     := -tags=seccomp,netgo,osusergo -ldflags=-extldflags=-static

.PHONY: all build test test-short bench lint proto demo demo-reapi deps deps-if-missing clean fuzz

all: build

build:
	$(GO) build -o $(BIN)/tvixfarm ./cmd/tvixfarm
	$(GO) build -o $(BIN)/farmctl ./cmd/farmctl

# The test suite: real redis-server, real gRPC over loopback, race detector.
# Installs the Debian packages it needs when they are missing (as root).
test: deps-if-missing
	PATH=$(dir $(GO)):$$PATH TVIXFARM_REQUIRE_REDIS=1 TVIXFARM_REQUIRE_SANDBOX=1 TVIXFARM_REQUIRE_NIX=1 $(GO) test -race -count=1 -timeout 20m ./...

test-short:
	$(GO) test -short -count=1 ./...

# Go benchmarks of the storage backends and services.
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./cas/... ./executor/...

# Short fuzzing runs of the parsers that face the network.
fuzz:
	$(GO) test ./cas/digest -run '^$$' -fuzz FuzzParseReadResourceName -fuzztime 30s
	$(GO) test ./cas/digest -run '^$$' -fuzz FuzzParseWriteResourceName -fuzztime 30s
	$(GO) test ./cas/digest -run '^$$' -fuzz FuzzParse -fuzztime 30s -fuzzminimizetime 100x

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# Regenerate the Go code of our .proto files (committed, so builds need no protoc).
proto: $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc
	@command -v protoc >/dev/null || { echo "protoc missing: apt-get install -y protobuf-compiler"; exit 1; }
	PATH=$(BIN):$$PATH protoc -I proto \
		--go_out=. --go_opt=module=tvixfarm \
		--go-grpc_out=. --go-grpc_opt=module=tvixfarm \
		$(PROTOS)

$(BIN)/protoc-gen-go:
	GOBIN=$(BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(BIN)/protoc-gen-go-grpc:
	GOBIN=$(BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

# The main job, on an embedded all-in-one farm: start it, show it serving
# (capabilities, status, a CAS benchmark round trip), stop it.
demo: build
	./scripts/demo.sh $(DATA)

# The REAPI side: tvixfarm serve, farmctl status, blobs and sandboxed actions.
demo-reapi: build
	./scripts/demo-reapi.sh $(DATA)

# System packages the tests and `make proto` need (Debian, as root).
deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server protobuf-compiler libseccomp-dev busybox-static gcc nix-bin jq

deps-if-missing:
	@command -v redis-server >/dev/null && test -e /usr/lib/x86_64-linux-gnu/libseccomp.a && test -x /bin/busybox && command -v nix-build >/dev/null && command -v jq >/dev/null || $(MAKE) deps
	@./scripts/nix-setup.sh >/dev/null

clean:
	rm -rf $(BIN) $(DATA)
