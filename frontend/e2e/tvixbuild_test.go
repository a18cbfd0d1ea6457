package e2e

import (
	"bytes"
	"context"
	"io"
	"maps"
	"path"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"google.golang.org/protobuf/proto"
	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/internal/nixtest"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/nixstore"
	"tvixfarm/frontend/tvixbuild"
	snixbuildpb "tvixfarm/proto/snix/build/v1"
	snixcastorepb "tvixfarm/proto/snix/castore/v1"
	buildpb "tvixfarm/proto/tvix/build/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// nixSandboxEnv is the fixed environment tvix-glue starts from (Snix's
// values: NIX_BUILD_TOP is /build).
var nixSandboxEnv = map[string]string{
	"HOME": "/homeless-shelter", "NIX_BUILD_CORES": "0", "NIX_BUILD_TOP": "/build", "NIX_LOG_FD": "2",
	"NIX_STORE": "/nix/store", "PATH": "/path-not-set", "PWD": "/build", "TEMP": "/build",
	"TEMPDIR": "/build", "TERM": "xterm-256color", "TMP": "/build", "TMPDIR": "/build",
}

// glueRequest is the BuildRequest tvix-glue makes of drv (§5.2, Snix's
// order: outputs by output name), with inputs the given castore nodes;
// it also returns the store path each needle stands for.
func glueRequest(t *testing.T, drvPath string, inputs map[string]*castorepb.Node) (*buildpb.BuildRequest, []string) {
	t.Helper()
	d, err := nixstore.ReadDerivation(drvPath)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for k, v := range nixSandboxEnv {
		env[k] = v
	}
	for k, v := range d.Env {
		env[k] = v
	}
	req := &buildpb.BuildRequest{
		CommandArgs:  append([]string{d.Builder}, d.Arguments...),
		WorkingDir:   "build",
		ScratchPaths: []string{"build", "nix/store"},
		InputsDir:    "nix/store",
		Constraints:  &buildpb.BuildRequest_BuildConstraints{System: d.Platform, ProvideBinSh: true},
	}
	for _, k := range sortedKeys(env) {
		req.EnvironmentVars = append(req.EnvironmentVars, &buildpb.BuildRequest_EnvVar{Key: k, Value: []byte(env[k])})
	}
	var needlePaths []string
	for _, name := range sortedKeys(d.Outputs) {
		p := d.Outputs[name].Path
		req.Outputs = append(req.Outputs, strings.TrimPrefix(p, "/"))
		needlePaths = append(needlePaths, p)
	}
	for _, p := range sortedKeys(inputs) {
		req.Inputs = append(req.Inputs, inputs[p])
		needlePaths = append(needlePaths, p)
	}
	for _, p := range needlePaths {
		req.RefscanNeedles = append(req.RefscanNeedles, path.Base(p)[:32])
	}
	return req, needlePaths
}

// TestTvixBuild sends BuildRequests made as tvix-glue makes them, for
// derivations of the corpus, to the farm's tvix.build.v1 and
// snix.build.v1 BuildService, and checks the outputs against nix-build
// (NAR hash and size, references from the needles) and against
// `tvixfarm build` of the same derivations (the same castore nodes).
func TestTvixBuild(t *testing.T) {
	requireSandbox(t)
	bb := nixtest.Busybox(t)
	tf := startFarm(t)
	s := salt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	drvs, err := nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{"trivial", "multiOutput"}, map[string]string{"busybox": bb, "salt": s})
	if err != nil {
		t.Fatal(err)
	}
	var reqs []coordinator.Request
	for _, d := range drvs {
		reqs = append(reqs, coordinator.Request{Drv: d})
	}
	// tvixfarm build first: it also puts busybox into the farm's store.
	if _, err := coordinator.New(tf.farm, tf.cfg).Build(ctx, reqs); err != nil {
		t.Fatal(err)
	}
	st := tf.e.Farm().Stores().Default
	trees := tvixbuild.StoreTrees{S: castore.NewStore(st.CAS, st.AC, t.TempDir())}
	castoreOf := func(p string) *castorepb.Node {
		t.Helper()
		infos, err := tf.farm.Store.Get(ctx, []string{p})
		if err != nil || infos[p] == nil {
			t.Fatalf("%s is not in the farm's store: %v", p, err)
		}
		n, err := coordinator.NarNode(infos[p].Node)
		if err != nil {
			t.Fatal(err)
		}
		cn, err := trees.ToCastore(ctx, n, []byte(path.Base(p)))
		if err != nil {
			t.Fatal(err)
		}
		return cn
	}
	tvix := buildpb.NewBuildServiceClient(tf.conn)
	snix := snixbuildpb.NewBuildServiceClient(tf.conn)
	for _, drv := range drvs {
		want, _, err := nixtest.Realise(ctx, drv)
		if err != nil {
			t.Fatal(err)
		}
		// Tvix sends only the direct inputs: busybox.
		req, needlePaths := glueRequest(t, drv, map[string]*castorepb.Node{bb: castoreOf(bb)})
		tres, err := tvix.DoBuild(ctx, req)
		if err != nil {
			t.Fatalf("%s: tvix DoBuild: %v", drv, err)
		}
		var sreq snixbuildpb.BuildRequest
		b, _ := proto.Marshal(req)
		if err := proto.Unmarshal(b, &sreq); err != nil {
			t.Fatal(err)
		}
		sres, err := snix.DoBuild(ctx, &sreq)
		if err != nil {
			t.Fatalf("%s: snix DoBuild: %v", drv, err)
		}
		if len(tres.Outputs) != len(req.Outputs) || len(tres.OutputsNeedles) != len(req.Outputs) || len(sres.Outputs) != len(req.Outputs) {
			t.Fatalf("%s: %d outputs asked, tvix answered %d (%d needle lists), snix %d", drv, len(req.Outputs), len(tres.Outputs), len(tres.OutputsNeedles), len(sres.Outputs))
		}
		for i, op := range req.Outputs {
			p := "/" + op
			var w *nixtest.PathInfo
			for _, pi := range want {
				if pi.Path == p {
					pi := pi
					w = &pi
				}
			}
			if w == nil {
				t.Fatalf("%s: nix built no %s", drv, p)
			}
			got := tres.Outputs[i]
			if name := string(castore.NodeName(got)); name != path.Base(p) {
				t.Errorf("%s: tvix output %d is named %q, want %q", drv, i, name, path.Base(p))
			}
			if !proto.Equal(got, castoreOf(p)) {
				t.Errorf("%s: output %s: DoBuild gave %v, tvixfarm build %v", drv, p, got, castoreOf(p))
			}
			// Snix: the same node, anonymous.
			se := sres.Outputs[i].GetOutput()
			if se == nil || len(castoreName(se)) != 0 {
				t.Errorf("%s: snix output %d: %v, want an anonymous entry", drv, i, se)
			}
			n, err := trees.ToREAPI(ctx, got)
			if err != nil {
				t.Fatal(err)
			}
			info, err := nar.Info(ctx, st.CAS, digest.BLAKE3, n, nil)
			if err != nil {
				t.Fatal(err)
			}
			if h := "sha256:" + nixtest.Nix32(info.NarHash[:]); h != w.NarHash || info.NarSize != w.NarSize {
				t.Errorf("%s: output %s: DoBuild NAR %s (%d bytes), nix %s (%d bytes)", drv, p, h, info.NarSize, w.NarHash, w.NarSize)
			}
			var refs []string
			for _, k := range tres.OutputsNeedles[i].Needles {
				refs = append(refs, needlePaths[k])
			}
			sort.Strings(refs)
			if !slices.Equal(refs, w.References) {
				t.Errorf("%s: output %s: needles found %v, nix references %v", drv, p, refs, w.References)
			}
			if !slices.Equal(sres.Outputs[i].Needles, tres.OutputsNeedles[i].Needles) {
				t.Errorf("%s: output %s: snix needles %v, tvix %v", drv, p, sres.Outputs[i].Needles, tres.OutputsNeedles[i].Needles)
			}
		}
	}

	// Tvix sends only direct inputs: the service adds their closure. The
	// builder reads chain-a, which only chain-b (the one input) refers to.
	chainDrvs, err := nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{"chain"}, map[string]string{"busybox": bb, "salt": s})
	if err != nil {
		t.Fatal(err)
	}
	cres, err := coordinator.New(tf.farm, tf.cfg).Build(ctx, []coordinator.Request{{Drv: chainDrvs[0]}})
	if err != nil {
		t.Fatal(err)
	}
	chainOut := cres.Outputs[chainDrvs[0]]["out"]
	infos, err := tf.farm.Store.Get(ctx, []string{chainOut})
	if err != nil || infos[chainOut] == nil {
		t.Fatalf("chain: %v", err)
	}
	var chainA, chainB string
	for _, r := range infos[chainOut].References {
		switch {
		case strings.HasSuffix(r, "-chain-a"):
			chainA = r
		case strings.HasSuffix(r, "-chain-b"):
			chainB = r
		}
	}
	if chainA == "" || chainB == "" {
		t.Fatalf("chain refers to %v", infos[chainOut].References)
	}
	out := "/nix/store/" + strings.Repeat("1", 32) + "-closure-probe-" + s
	probe := &buildpb.BuildRequest{
		Inputs:       []*castorepb.Node{castoreOf(bb), castoreOf(chainB)},
		CommandArgs:  []string{bb + "/bin/sh", "-c", "cat " + chainA + "/a.txt > $out"},
		WorkingDir:   "build",
		ScratchPaths: []string{"build", "nix/store"},
		InputsDir:    "nix/store",
		Outputs:      []string{strings.TrimPrefix(out, "/")},
		EnvironmentVars: []*buildpb.BuildRequest_EnvVar{
			{Key: "PATH", Value: []byte(bb + "/bin")}, {Key: "out", Value: []byte(out)},
		},
		Constraints: &buildpb.BuildRequest_BuildConstraints{System: "x86_64-linux"},
	}
	if bytes.Compare(probe.Inputs[0].GetDirectory().Name, probe.Inputs[1].GetDirectory().Name) > 0 {
		probe.Inputs[0], probe.Inputs[1] = probe.Inputs[1], probe.Inputs[0]
	}
	pres, err := tvix.DoBuild(ctx, probe)
	if err != nil {
		t.Fatalf("closure probe: %v", err)
	}
	if f := pres.Outputs[0].GetFile(); f == nil {
		t.Errorf("closure probe: output %v, want a file", pres.Outputs[0])
	} else if r, err := st.CAS.Get(ctx, digest.New(digest.BLAKE3, [32]byte(f.Digest), int64(f.Size))); err != nil {
		t.Error(err)
	} else {
		data, _ := io.ReadAll(r)
		r.Close()
		if string(data) != "I am a\n" {
			t.Errorf("closure probe: output %q, want chain-a's a.txt", data)
		}
	}

	// A failing builder: INTERNAL, with the exit code and the log.
	fails, err := nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{"builderFails"}, map[string]string{"busybox": bb, "salt": s})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := glueRequest(t, fails[0], map[string]*castorepb.Node{bb: castoreOf(bb)})
	_, err = tvix.DoBuild(ctx, req)
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "exited with code 3") || !strings.Contains(err.Error(), "about to fail with exit code 3") {
		t.Errorf("failing build: %v, want INTERNAL with the exit code and the log tail", err)
	}
	// A bad request: INVALID_ARGUMENT, nothing run.
	req.EnvironmentVars[0], req.EnvironmentVars[1] = req.EnvironmentVars[1], req.EnvironmentVars[0]
	if _, err := tvix.DoBuild(ctx, req); status.Code(err) != codes.InvalidArgument {
		t.Errorf("unsorted environment: %v, want INVALID_ARGUMENT", err)
	}
	// An input the farm does not have.
	req, _ = glueRequest(t, fails[0], map[string]*castorepb.Node{"/nix/store/00000000000000000000000000000000-nothing": {Node: &castorepb.Node_Directory{Directory: &castorepb.DirectoryNode{Name: []byte("00000000000000000000000000000000-nothing"), Digest: make([]byte, 32), Size: 1}}}})
	if _, err := tvix.DoBuild(ctx, req); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("missing input: %v, want FAILED_PRECONDITION", err)
	}
}

func castoreName(e *snixcastorepb.Entry) []byte {
	switch {
	case e.GetDirectory() != nil:
		return e.GetDirectory().Name
	case e.GetFile() != nil:
		return e.GetFile().Name
	case e.GetSymlink() != nil:
		return e.GetSymlink().Name
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }
