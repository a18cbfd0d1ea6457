package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"slices"
	"sort"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/nixstore"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// Import registers paths and their closures in the local Nix store, from
// the farm: the paths the local store lacks are streamed as NARs into
// `nix-store --import`, references first, with their references and
// deriver. It returns how many paths it imported.
func Import(ctx context.Context, farm Farm, local *nixstore.Store, paths []string) (int, error) {
	r := &run{c: &Coordinator{farm: farm}, infos: map[string]*storepb.PathInfo{}}
	closure, err := r.closure(ctx, paths)
	if err != nil {
		return 0, err
	}
	all := make([]string, 0, len(closure))
	for p := range closure {
		all = append(all, p)
	}
	sort.Strings(all)
	valid, err := localValid(ctx, local, all)
	if err != nil {
		return 0, err
	}
	// References first.
	var order []string
	done := map[string]bool{}
	var visit func(p string)
	visit = func(p string) {
		if done[p] {
			return
		}
		done[p] = true
		for _, ref := range closure[p].References {
			if ref != p {
				visit(ref)
			}
		}
		if !valid[p] {
			order = append(order, p)
		}
	}
	for _, p := range all {
		visit(p)
	}
	if len(order) == 0 {
		return 0, nil
	}
	exports := make([]nixstore.Export, len(order))
	nodes := make([]nar.Node, len(order))
	for i, p := range order {
		info := closure[p]
		n, err := NarNode(info.Node)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", p, err)
		}
		nodes[i] = n
	}
	cas := prefetchFiles(ctx, farm.CAS, nodes)
	for i, p := range order {
		info := closure[p]
		n := nodes[i]
		fn, ok := digest.FunctionFromName(info.Node.GetDigestFunction())
		if !ok {
			fn = digest.BLAKE3
		}
		exports[i] = nixstore.Export{
			Path:       p,
			References: slices.Clone(info.References),
			Deriver:    info.Deriver,
			WriteNAR: func(w io.Writer) error {
				return nar.Write(ctx, cas, fn, n, w)
			},
		}
	}
	if err := local.Import(ctx, exports); err != nil {
		return 0, err
	}
	return len(order), nil
}

// localValid reports which of paths are valid in the local store. A path
// with nothing at its name is not (Nix keeps the file of every valid path),
// so only the paths that exist are asked of nix-store: freshly built
// outputs cost no nix-store run. At worst a path reported invalid is valid
// after all (in a store whose files are elsewhere), and nix-store --import
// skips it.
func localValid(ctx context.Context, local *nixstore.Store, paths []string) (map[string]bool, error) {
	valid := make(map[string]bool, len(paths))
	var ask []string
	for _, p := range paths {
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			valid[p] = false
			continue
		}
		ask = append(ask, p)
	}
	if len(ask) == 0 {
		return valid, nil
	}
	v, err := local.Valid(ctx, ask)
	if err != nil {
		return nil, err
	}
	maps.Copy(valid, v)
	return valid, nil
}

// Paths that are a single small file are read ahead, in batches.
const (
	prefetchFileBelow = 1 << 20
	prefetchBudget    = 64 << 20
)

// prefetchFiles reads the contents of the nodes that are regular files
// below prefetchFileBelow, up to prefetchBudget bytes in all, from cas in
// as few round trips as blobstore.GetBatch needs, and returns cas with
// those blobs served from memory. Otherwise the NAR of each such path
// would cost a round trip of its own while nix-store waits for it. Blobs
// that cannot be read ahead are left to cas.
func prefetchFiles(ctx context.Context, cas blobstore.BlobAccess, nodes []nar.Node) blobstore.BlobAccess {
	var ds []digest.Digest
	seen := map[digest.Digest]bool{}
	var total int64
	for _, n := range nodes {
		d := n.Digest
		if n.Type != nar.Regular || d.Size() == 0 || d.Size() >= prefetchFileBelow || seen[d] || total+d.Size() > prefetchBudget {
			continue
		}
		seen[d] = true
		total += d.Size()
		ds = append(ds, d)
	}
	if len(ds) < 2 {
		return cas
	}
	data, errs := blobstore.GetBatch(ctx, cas, ds, prefetchFileBelow)
	m := make(map[digest.Digest][]byte, len(ds))
	for i, d := range ds {
		if errs[i] == nil && int64(len(data[i])) == d.Size() {
			m[d] = data[i]
		}
	}
	return prefetched{BlobAccess: cas, blobs: m}
}

// prefetched is a BlobAccess that serves some blobs, read and verified
// already, from memory.
type prefetched struct {
	blobstore.BlobAccess
	blobs map[digest.Digest][]byte
}

func (p prefetched) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	if data, ok := p.blobs[d]; ok {
		return io.NopCloser(bytes.NewReader(data)), nil
	}
	return p.BlobAccess.Get(ctx, d)
}
