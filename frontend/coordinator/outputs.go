package coordinator

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"

	"tvixfarm/cas/blobstore"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/frontend/translate"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// outputs turns the outputs of a successful action into path infos,
// checking them as Nix does after a build: every output exists, fixed
// output hashes match, references obey the derivation's rules, and
// outputs do not refer to each other in a cycle.
func (r *run) outputs(ctx context.Context, n *node, act *translate.Action, res *repb.ActionResult, closure map[string]*storepb.PathInfo) ([]*storepb.PathInfo, error) {
	d := n.drv
	fn := act.Digest.Function()
	cas := r.c.farm.CAS
	names := slices.Sorted(maps.Keys(act.Outputs))
	nodes := make([]nar.Node, len(names))
	for i, name := range names {
		p := act.Outputs[name]
		nd, ok, err := nar.FromActionResult(ctx, cas, fn, res, ".."+p)
		if err != nil {
			return nil, fmt.Errorf("output %s: %w", name, err)
		}
		if !ok {
			r.c.log.Debug("output missing", "drv", d.Path, "want", ".."+p, "files", len(res.GetOutputFiles()), "dirs", len(res.GetOutputDirectories()), "result", res.String())
			return nil, &BuildError{Msg: fmt.Sprintf("builder for '%s' failed to produce output path for output '%s' at '%s'", d.Path, name, p)}
		}
		nodes[i] = nd
	}
	candidates := slices.Collect(maps.Keys(closure))
	for _, name := range names {
		candidates = append(candidates, act.Outputs[name])
	}
	infos := make([]*storepb.PathInfo, len(names))
	errs := make([]error, len(names))
	blobstore.ParallelFor(len(names), func(i int) {
		info, err := nar.Info(ctx, cas, fn, nodes[i], candidates)
		if err != nil {
			errs[i] = fmt.Errorf("output %s: %w", names[i], err)
			return
		}
		refs := slices.Clone(info.References)
		sort.Strings(refs)
		infos[i] = &storepb.PathInfo{
			StorePath:        act.Outputs[names[i]],
			Node:             nodeProto(fn.String(), nodes[i]),
			NarSha256:        info.NarHash[:],
			NarSize:          info.NarSize,
			References:       refs,
			Deriver:          d.Path,
			RegistrationTime: time.Now().Unix(),
		}
	})
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if act.Fixed {
		if err := r.checkFixed(ctx, n, nodes[0], infos[0]); err != nil {
			return nil, err
		}
	}
	if err := checkCycles(d, names, infos); err != nil {
		return nil, err
	}
	if err := checkReferences(d, act.Outputs, infos, closure); err != nil {
		return nil, err
	}
	return infos, nil
}

func nodeProto(fn string, n nar.Node) *storepb.Node {
	switch n.Type {
	case nar.Directory:
		return &storepb.Node{Kind: storepb.Node_DIRECTORY, DigestFunction: fn, Digest: pathinfo.DigestProto(n.Digest)}
	case nar.Regular:
		return &storepb.Node{Kind: storepb.Node_FILE, DigestFunction: fn, Digest: pathinfo.DigestProto(n.Digest), Executable: n.Executable}
	default:
		return &storepb.Node{Kind: storepb.Node_SYMLINK, DigestFunction: fn, Target: n.Target}
	}
}

// NarNode converts a path info's node.
func NarNode(n *storepb.Node) (nar.Node, error) {
	switch n.GetKind() {
	case storepb.Node_SYMLINK:
		return nar.SymlinkNode(n.Target), nil
	case storepb.Node_DIRECTORY, storepb.Node_FILE:
		d, _, err := pathinfo.NodeDigest(n)
		if err != nil {
			return nar.Node{}, err
		}
		if n.Kind == storepb.Node_DIRECTORY {
			return nar.DirectoryNode(d), nil
		}
		return nar.FileNode(d, n.Executable), nil
	}
	return nar.Node{}, fmt.Errorf("node of unknown kind %v", n.GetKind())
}

// checkFixed checks a fixed-output derivation's output against its hash
// and sets its content address.
func (r *run) checkFixed(ctx context.Context, n *node, nd nar.Node, info *storepb.PathInfo) error {
	d := n.drv
	o := d.Outputs["out"]
	mode, algoName := "flat", o.HashAlgorithm
	if a, ok := strings.CutPrefix(algoName, "r:"); ok {
		mode, algoName = "recursive", a
	}
	algo, err := nixhash.ParseAlgorithm(algoName)
	if err != nil {
		return fmt.Errorf("%s: %w", d.Path, err)
	}
	raw, err := hex.DecodeString(o.Hash)
	if err != nil {
		return fmt.Errorf("%s: output hash %q is not base-16", d.Path, o.Hash)
	}
	want, err := nixhash.NewHash(algo, raw)
	if err != nil {
		return fmt.Errorf("%s: output hash: %w", d.Path, err)
	}
	if len(info.References) > 0 {
		return &BuildError{Msg: fmt.Sprintf("fixed-output derivation '%s' produced an output that refers to other store paths: %s", d.Path, strings.Join(info.References, ", "))}
	}
	got, err := nar.FixedHash(ctx, r.c.farm.CAS, r.c.cfg.Translate.DigestFunction, nd, mode, algo)
	if err != nil {
		if errors.Is(err, nar.ErrNotRegular) {
			return &BuildError{Msg: fmt.Sprintf("fixed-output derivation '%s' with flat hashing must produce a regular file", d.Path)}
		}
		return fmt.Errorf("%s: hashing the output: %w", d.Path, err)
	}
	if !slices.Equal(got.Digest(), want.Digest()) {
		return &BuildError{Msg: fmt.Sprintf("hash mismatch in fixed-output derivation '%s':\n  specified: %s\n     got:    %s",
			d.Path, want.Format(nixhash.SRI, true), got.Format(nixhash.SRI, true))}
	}
	prefix := "fixed:"
	if mode == "recursive" {
		prefix += "r:"
	}
	info.Ca = prefix + algo.String() + ":" + nixbase32.EncodeToString(raw)
	return nil
}

// checkCycles fails if outputs refer to each other in a cycle.
func checkCycles(d *translate.Derivation, names []string, infos []*storepb.PathInfo) error {
	byPath := map[string]int{}
	for i, info := range infos {
		byPath[info.StorePath] = i
	}
	state := make([]int, len(infos))
	var visit func(i int, from int) error
	visit = func(i, from int) error {
		switch state[i] {
		case 1:
			return &BuildError{Msg: fmt.Sprintf("cycle detected in build of '%s' in the references of output '%s' from output '%s'", d.Path, names[i], names[from])}
		case 2:
			return nil
		}
		state[i] = 1
		for _, ref := range infos[i].References {
			if j, ok := byPath[ref]; ok && j != i {
				if err := visit(j, i); err != nil {
					return err
				}
			}
		}
		state[i] = 2
		return nil
	}
	for i := range infos {
		if err := visit(i, i); err != nil {
			return err
		}
	}
	return nil
}
