package farm

import (
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"log/slog"
	"os"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/translate"
	"tvixfarm/frontend/tvixbuild"
	snixbuildpb "tvixfarm/proto/snix/build/v1"
	buildpb "tvixfarm/proto/tvix/build/v1"
)

// staticShells are where a static shell for BuildRequests with
// provide_bin_sh is looked for (Debian's busybox-static first).
var staticShells = []string{"/bin/busybox", "/usr/bin/busybox"}

// registerBuildService serves tvix.build.v1 and snix.build.v1
// BuildService when this process has the farm's store and an execution
// service (its scheduler or a gateway backend): builds run as actions
// through the farm's own Execution service, over loopback.
func (f *Farm) registerBuildService(ctx context.Context, log *slog.Logger) error {
	if f.castore == nil || (f.sched == nil && f.gw == nil) {
		return nil
	}
	conn, err := grpc.NewClient(f.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("build service: %w", err)
	}
	f.closers = append(f.closers, conn)
	st := f.stores.Default
	cfg := tvixbuild.Config{
		CAS:       st.CAS,
		Paths:     f.paths,
		Trees:     tvixbuild.StoreTrees{S: f.castore},
		Execution: repb.NewExecutionClient(conn),
		Logger:    log,
	}
	if len(f.cfg.Executor.Systems) > 0 {
		cfg.DefaultSystem = f.cfg.Executor.Systems[0]
	}
	sh, err := staticShell(ctx, st.CAS)
	if err != nil {
		log.Warn("build service: no static shell for provide_bin_sh", "err", err)
	} else {
		cfg.BinSh = sh
	}
	s := tvixbuild.New(cfg)
	buildpb.RegisterBuildServiceServer(f.srv, tvixbuild.TvixServer{S: s})
	snixbuildpb.RegisterBuildServiceServer(f.srv, tvixbuild.SnixServer{S: s})
	return nil
}

// staticShell stores the first static shell of staticShells in cas.
func staticShell(ctx context.Context, cas blobstore.BlobAccess) (*translate.File, error) {
	for _, p := range staticShells {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		e, err := elf.NewFile(bytes.NewReader(data))
		if err != nil {
			continue
		}
		dynamic := false
		for _, prog := range e.Progs {
			dynamic = dynamic || prog.Type == elf.PT_INTERP
		}
		if dynamic {
			continue
		}
		d := digest.Compute(digest.BLAKE3, data)
		if err := cas.Put(ctx, d, bytes.NewReader(data)); err != nil {
			return nil, fmt.Errorf("storing %s: %w", p, err)
		}
		return &translate.File{Digest: d, Executable: true}, nil
	}
	return nil, fmt.Errorf("none of %v is a static executable (apt-get install busybox-static)", staticShells)
}
