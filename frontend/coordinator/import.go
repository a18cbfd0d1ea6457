package coordinator

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sort"

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
	valid, err := local.Valid(ctx, all)
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
	for i, p := range order {
		info := closure[p]
		n, err := NarNode(info.Node)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", p, err)
		}
		fn, ok := digest.FunctionFromName(info.Node.GetDigestFunction())
		if !ok {
			fn = digest.BLAKE3
		}
		exports[i] = nixstore.Export{
			Path:       p,
			References: slices.Clone(info.References),
			Deriver:    info.Deriver,
			WriteNAR: func(w io.Writer) error {
				return nar.Write(ctx, farm.CAS, fn, n, w)
			},
		}
	}
	if err := local.Import(ctx, exports); err != nil {
		return 0, err
	}
	return len(order), nil
}
