package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/nixstore"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// uploadLocal uploads local store paths to the farm's CAS and returns
// their path infos. Each path's NAR hash is computed while it is read
// and must match what the local store recorded.
func uploadLocal(ctx context.Context, farm Farm, fn digest.Function, paths []nixstore.PathInfo) ([]*storepb.PathInfo, error) {
	infos := make([]*storepb.PathInfo, len(paths))
	errs := make([]error, len(paths))
	blobstore.ParallelFor(len(paths), func(i int) {
		p := paths[i]
		want, err := p.NarSHA256()
		if err != nil {
			errs[i] = err
			return
		}
		ing, err := nar.Ingest(ctx, p.Path, fn)
		if err != nil {
			errs[i] = fmt.Errorf("reading %s: %w", p.Path, err)
			return
		}
		if !bytes.Equal(ing.NarHash[:], want) || ing.NarSize != p.NarSize {
			errs[i] = fmt.Errorf("%s in the local store does not match its NAR hash (the local store is corrupt; nix-store --verify --check-contents)", p.Path)
			return
		}
		if err := nar.Upload(ctx, farm.CAS, ing); err != nil {
			errs[i] = fmt.Errorf("uploading %s: %w", p.Path, err)
			return
		}
		infos[i] = &storepb.PathInfo{
			StorePath:        p.Path,
			Node:             nodeProto(fn.String(), ing.Node),
			NarSha256:        want,
			NarSize:          p.NarSize,
			References:       p.References,
			Deriver:          p.Deriver,
			Ca:               p.CA,
			RegistrationTime: time.Now().Unix(),
		}
	})
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return infos, nil
}
