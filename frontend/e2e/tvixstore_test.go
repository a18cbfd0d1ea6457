package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"path"
	"strings"
	"testing"
	"time"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/zeebo/blake3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/internal/nixtest"
	"tvixfarm/frontend/nar"
	snixcastorepb "tvixfarm/proto/snix/castore/v1"
	snixstorepb "tvixfarm/proto/snix/store/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
	tvixstorepb "tvixfarm/proto/tvix/store/v1"
)

// tvixClient is what a Tvix client does with the farm's store services:
// it ingests NARs into castore (BlobService.Put per file,
// DirectoryService.Put of the closure, leaves first) and puts path infos.
type tvixClient struct {
	blobs tvixBlobs
	dirs  castorepb.DirectoryServiceClient
	paths tvixstorepb.PathInfoServiceClient
}

type tvixBlobs = castorepb.BlobServiceClient

func newTvixClient(conn grpc.ClientConnInterface) *tvixClient {
	return &tvixClient{castorepb.NewBlobServiceClient(conn), castorepb.NewDirectoryServiceClient(conn), tvixstorepb.NewPathInfoServiceClient(conn)}
}

func (c *tvixClient) putBlob(ctx context.Context, r io.Reader) ([]byte, uint64, error) {
	s, err := c.blobs.Put(ctx)
	if err != nil {
		return nil, 0, err
	}
	h := blake3.New()
	buf := make([]byte, 256<<10)
	var n uint64
	for {
		m, err := io.ReadFull(r, buf)
		if m > 0 {
			h.Write(buf[:m])
			n += uint64(m)
			if err := s.Send(&castorepb.BlobChunk{Data: buf[:m]}); err != nil {
				return nil, 0, err
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return nil, 0, err
		}
	}
	resp, err := s.CloseAndRecv()
	if err != nil {
		return nil, 0, err
	}
	if !bytes.Equal(resp.Digest, h.Sum(nil)) {
		return nil, 0, fmt.Errorf("Put returned %x, want %x", resp.Digest, h.Sum(nil))
	}
	return resp.Digest, n, nil
}

// ingestNAR reads a NAR into castore and returns its anonymous root node.
func (c *tvixClient) ingestNAR(ctx context.Context, r io.Reader) (*castorepb.Node, error) {
	nr, err := gonar.NewReader(r)
	if err != nil {
		return nil, err
	}
	type frame struct {
		path string
		dir  *castorepb.Directory
	}
	var stack []frame
	var dirs []*castorepb.Directory
	var root *castorepb.Node
	pop := func() error {
		f := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		h, _, err := castore.Digest(f.dir)
		if err != nil {
			return err
		}
		size, err := castore.Size(f.dir)
		if err != nil {
			return err
		}
		dirs = append(dirs, f.dir)
		if len(stack) == 0 {
			root = &castorepb.Node{Node: &castorepb.Node_Directory{Directory: &castorepb.DirectoryNode{Digest: h[:], Size: size}}}
			return nil
		}
		parent := stack[len(stack)-1].dir
		parent.Directories = append(parent.Directories, &castorepb.DirectoryNode{Name: []byte(path.Base(f.path)), Digest: h[:], Size: size})
		return nil
	}
	for {
		hdr, err := nr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		for len(stack) > 0 && !strings.HasPrefix(hdr.Path, strings.TrimSuffix(stack[len(stack)-1].path, "/")+"/") {
			if err := pop(); err != nil {
				return nil, err
			}
		}
		name := []byte(path.Base(hdr.Path))
		var node *castorepb.Node
		switch hdr.Type {
		case gonar.TypeDirectory:
			stack = append(stack, frame{path: hdr.Path, dir: &castorepb.Directory{}})
			continue
		case gonar.TypeRegular:
			h, n, err := c.putBlob(ctx, nr)
			if err != nil {
				return nil, err
			}
			node = &castorepb.Node{Node: &castorepb.Node_File{File: &castorepb.FileNode{Name: name, Digest: h, Size: n, Executable: hdr.Executable}}}
		case gonar.TypeSymlink:
			node = &castorepb.Node{Node: &castorepb.Node_Symlink{Symlink: &castorepb.SymlinkNode{Name: name, Target: []byte(hdr.LinkTarget)}}}
		}
		if hdr.Path == "/" {
			root = castore.WithName(node, nil)
			continue
		}
		parent := stack[len(stack)-1].dir
		if f := node.GetFile(); f != nil {
			parent.Files = append(parent.Files, f)
		} else {
			parent.Symlinks = append(parent.Symlinks, node.GetSymlink())
		}
	}
	for len(stack) > 0 {
		if err := pop(); err != nil {
			return nil, err
		}
	}
	if len(dirs) > 0 {
		s, err := c.dirs.Put(ctx)
		if err != nil {
			return nil, err
		}
		for _, d := range dirs {
			if err := s.Send(d); err != nil {
				break
			}
		}
		resp, err := s.CloseAndRecv()
		if err != nil {
			return nil, fmt.Errorf("DirectoryService.Put: %w", err)
		}
		if !bytes.Equal(resp.RootDigest, root.GetDirectory().Digest) {
			return nil, fmt.Errorf("DirectoryService.Put returned root %x, want %x", resp.RootDigest, root.GetDirectory().Digest)
		}
	}
	return root, nil
}

// nixDump is `nix-store --dump p`: the NAR as Nix serialises it.
func nixDump(ctx context.Context, t *testing.T, p string) []byte {
	t.Helper()
	out, err := exec.CommandContext(ctx, "nix-store", "--dump", p).Output()
	if err != nil {
		t.Fatalf("nix-store --dump %s: %v", p, err)
	}
	return out
}

func hash20(t *testing.T, p string) []byte {
	t.Helper()
	h, err := nixbase32.DecodeString(path.Base(p)[:32])
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// tvixPathInfo is the PathInfo a Tvix client puts for a path Nix built.
func tvixPathInfo(t *testing.T, info nixtest.PathInfo, root *castorepb.Node) *tvixstorepb.PathInfo {
	t.Helper()
	sha, err := nixbase32.DecodeString(strings.TrimPrefix(info.NarHash, "sha256:"))
	if err != nil {
		t.Fatal(err)
	}
	pi := &tvixstorepb.PathInfo{
		Node:    castore.WithName(root, []byte(path.Base(info.Path))),
		Narinfo: &tvixstorepb.NARInfo{NarSize: info.NarSize, NarSha256: sha},
	}
	for _, r := range info.References {
		pi.References = append(pi.References, hash20(t, r))
		pi.Narinfo.ReferenceNames = append(pi.Narinfo.ReferenceNames, path.Base(r))
	}
	if info.Deriver != "" {
		b := path.Base(info.Deriver)
		pi.Narinfo.Deriver = &tvixstorepb.StorePath{Name: strings.TrimSuffix(b[33:], ".drv"), Digest: hash20(t, info.Deriver)}
	}
	return pi
}

// TestTvixStore checks the farm's Tvix/Snix store services against real
// Nix and `tvixfarm build`:
//   - outputs built by nix-build, ingested from their NARs through
//     BlobService and DirectoryService, render to the same NAR, bit for bit
//     (CalculateNAR, and the NAR itself), and their castore roots are the ones
//     the farm derives from its own builds of the same derivations;
//   - a path a Tvix client Puts is a farm path info that `tvixfarm build`
//     uses as the input of a build instead of building it;
//   - paths built by `tvixfarm build` are visible through PathInfoService.Get
//     of both families, with castore trees DirectoryService serves.
func TestTvixStore(t *testing.T) {
	requireSandbox(t)
	bb := nixtest.Busybox(t)
	tf := startFarm(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := newTvixClient(tf.conn)
	snixPaths := snixstorepb.NewPathInfoServiceClient(tf.conn)
	snixDirs := snixcastorepb.NewDirectoryServiceClient(tf.conn)
	st := tf.e.Farm().Stores().Default
	cst := castore.NewStore(st.CAS, st.AC, t.TempDir())

	// 1. Nix builds; a Tvix client ingests the outputs and puts them.
	s1 := salt(t)
	cases := []string{"trivial", "multiOutput", "fileTypes", "unicode", "selfReference", "allowedReferencesOk"}
	drvs, err := nixtest.Instantiate(ctx, nixtest.CorpusFile(), cases, map[string]string{"busybox": bb, "salt": s1})
	if err != nil {
		t.Fatal(err)
	}
	var chainA nixtest.PathInfo
	var dependent string // allowedReferencesOk's .drv
	for _, drv := range drvs {
		outs, _, err := nixtest.Realise(ctx, drv)
		if err != nil {
			t.Fatal(err)
		}
		for _, info := range outs {
			if strings.Contains(drv, "allowed-references-ok") {
				dependent = drv
				for _, r := range info.References {
					if strings.HasSuffix(r, "chain-a"+"-"+s1) || strings.Contains(path.Base(r), "-chain-a") {
						refs, err := nixtest.QueryPathInfo(ctx, r)
						if err != nil {
							t.Fatal(err)
						}
						chainA = refs[r]
					}
				}
				continue // built by the farm below, from the Tvix-put chain-a
			}
			checkRoundTrip(ctx, t, c, cst, snixPaths, info)
		}
	}
	if chainA.Path == "" || dependent == "" {
		t.Fatal("chain-a not found among allowedReferencesOk's references")
	}
	checkRoundTrip(ctx, t, c, cst, snixPaths, chainA)

	// A name that is not UTF-8: castore stores it and CalculateNAR renders
	// it from the castore tree, as Nix does; it has no REAPI form, so it
	// cannot become a farm path info.
	drvs, err = nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{"nonUtf8Name"}, map[string]string{"busybox": bb, "salt": s1})
	if err != nil {
		t.Fatal(err)
	}
	nonUTF8, _, err := nixtest.Realise(ctx, drvs[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, info := range nonUTF8 {
		root, err := c.ingestNAR(ctx, bytes.NewReader(nixDump(ctx, t, info.Path)))
		if err != nil {
			t.Fatalf("%s: ingest: %v", info.Path, err)
		}
		cn, err := c.paths.CalculateNAR(ctx, root)
		if err != nil || "sha256:"+nixtest.Nix32(cn.NarSha256) != info.NarHash || cn.NarSize != info.NarSize {
			t.Errorf("%s: CalculateNAR = %v, %v; Nix %s %d", info.Path, cn, err, info.NarHash, info.NarSize)
		}
		if _, err := c.paths.Put(ctx, tvixPathInfo(t, info, root)); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "UTF-8") {
			t.Errorf("%s: Put of a non-UTF-8 tree: %v, want FailedPrecondition", info.Path, err)
		}
		t.Logf("%s: CalculateNAR from castore matches Nix", info.Path)
	}

	// 2. The Tvix-put chain-a is an input of a farm build.
	res, err := coordinator.New(tf.farm, tf.cfg).Build(ctx, []coordinator.Request{{Drv: dependent}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Errors) > 0 {
		t.Fatalf("tvixfarm build %s: %v", dependent, res.Errors)
	}
	if res.Counts.Built != 1 {
		t.Errorf("tvixfarm build of %s built %d derivations, want 1 (chain-a comes from the Tvix Put)", dependent, res.Counts.Built)
	}
	nixOuts, err := nixtest.Outputs(ctx, dependent)
	if err != nil {
		t.Fatal(err)
	}
	want, err := nixtest.QueryPathInfo(ctx, nixOuts["out"])
	if err != nil {
		t.Fatal(err)
	}
	got, err := tf.farm.Store.Get(ctx, []string{nixOuts["out"]})
	if err != nil || got[nixOuts["out"]] == nil {
		t.Fatalf("farm path info of %s: %v", nixOuts["out"], err)
	}
	if nixtest.Nix32(got[nixOuts["out"]].NarSha256) != strings.TrimPrefix(want[nixOuts["out"]].NarHash, "sha256:") {
		t.Errorf("%s: the farm's output differs from Nix's", nixOuts["out"])
	}

	// 3. Paths built by tvixfarm build are visible to Tvix and Snix
	// clients, as the castore trees of Nix's NARs.
	s2 := salt(t)
	drvs, err = nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{"multiOutput", "fileTypes", "trivial"}, map[string]string{"busybox": bb, "salt": s2})
	if err != nil {
		t.Fatal(err)
	}
	var reqs []coordinator.Request
	for _, d := range drvs {
		reqs = append(reqs, coordinator.Request{Drv: d})
	}
	res, err = coordinator.New(tf.farm, tf.cfg).Build(ctx, reqs)
	if err != nil || len(res.Errors) > 0 {
		t.Fatalf("tvixfarm build: %v %v", err, res.Errors)
	}
	// List (the farm's path-info index) names every path the build made.
	ls, err := c.paths.List(ctx, &tvixstorepb.ListPathInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for {
		li, err := ls.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("List: %v", err)
		}
		listed[string(castore.NodeName(li.Node))] = true
	}
	for _, drv := range drvs {
		for _, p := range res.Outputs[drv] {
			if !listed[path.Base(p)] {
				t.Errorf("List does not name %s", p)
			}
		}
	}
	for _, drv := range drvs {
		nixInfos, _, err := nixtest.Realise(ctx, drv)
		if err != nil {
			t.Fatal(err)
		}
		for _, ni := range nixInfos {
			h := hash20(t, ni.Path)
			tp, err := c.paths.Get(ctx, &tvixstorepb.GetPathInfoRequest{ByWhat: &tvixstorepb.GetPathInfoRequest_ByOutputHash{ByOutputHash: h}})
			if err != nil {
				t.Fatalf("tvix Get(%s): %v", ni.Path, err)
			}
			sp, err := snixPaths.Get(ctx, &snixstorepb.GetPathInfoRequest{ByWhat: &snixstorepb.GetPathInfoRequest_ByOutputHash{ByOutputHash: h}})
			if err != nil {
				t.Fatalf("snix Get(%s): %v", ni.Path, err)
			}
			if b1, b2 := mustMarshal(t, tp), mustMarshal(t, sp); !bytes.Equal(b1, b2) {
				t.Errorf("%s: tvix and snix Get differ", ni.Path)
			}
			if string(castore.NodeName(tp.Node)) != path.Base(ni.Path) {
				t.Errorf("%s: node named %q", ni.Path, castore.NodeName(tp.Node))
			}
			if nixtest.Nix32(tp.Narinfo.NarSha256) != strings.TrimPrefix(ni.NarHash, "sha256:") || tp.Narinfo.NarSize != ni.NarSize {
				t.Errorf("%s: Get says NAR %s/%d, Nix %s/%d", ni.Path, nixtest.Nix32(tp.Narinfo.NarSha256), tp.Narinfo.NarSize, ni.NarHash, ni.NarSize)
			}
			if len(tp.Narinfo.ReferenceNames) != len(ni.References) {
				t.Errorf("%s: references %v, Nix %v", ni.Path, tp.Narinfo.ReferenceNames, ni.References)
			}
			if tp.Narinfo.Deriver == nil || tp.Narinfo.Deriver.Name+".drv" != path.Base(drv)[33:] {
				t.Errorf("%s: deriver %v, want %s", ni.Path, tp.Narinfo.Deriver, drv)
			}
			// The castore root equals the ingest of Nix's NAR.
			fromNix, err := c.ingestNAR(ctx, bytes.NewReader(nixDump(ctx, t, ni.Path)))
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(castore.WithName(tp.Node, nil), fromNix) {
				t.Errorf("%s: farm-built castore root %v, Nix's NAR ingests to %v", ni.Path, tp.Node, fromNix)
			}
			t.Logf("%s: farm-built, visible to Tvix and Snix", ni.Path)
			cn, err := c.paths.CalculateNAR(ctx, castore.WithName(tp.Node, nil))
			if err != nil || nixtest.Nix32(cn.NarSha256) != strings.TrimPrefix(ni.NarHash, "sha256:") {
				t.Errorf("%s: CalculateNAR = %v, %v", ni.Path, cn, err)
			}
			if d := tp.Node.GetDirectory(); d != nil {
				stream, err := snixDirs.Get(ctx, &snixcastorepb.GetDirectoryRequest{ByWhat: &snixcastorepb.GetDirectoryRequest_Digest{Digest: d.Digest}, Recursive: true})
				if err != nil {
					t.Fatal(err)
				}
				first, err := stream.Recv()
				if err != nil {
					t.Fatalf("%s: DirectoryService.Get: %v", ni.Path, err)
				}
				var fd castorepb.Directory
				proto.Unmarshal(mustMarshal(t, first), &fd)
				if h, _, _ := castore.Digest(&fd); !bytes.Equal(h[:], d.Digest) {
					t.Errorf("%s: recursive Get starts with %x, want the root %x", ni.Path, h, d.Digest)
				}
			}
		}
	}
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkRoundTrip ingests a path Nix built from its NAR, checks that the
// castore tree renders to Nix's NAR bit for bit, puts its path info and
// gets it back through both families.
func checkRoundTrip(ctx context.Context, t *testing.T, c *tvixClient, cst *castore.Store, snixPaths snixstorepb.PathInfoServiceClient, info nixtest.PathInfo) {
	t.Helper()
	dump := nixDump(ctx, t, info.Path)
	root, err := c.ingestNAR(ctx, bytes.NewReader(dump))
	if err != nil {
		t.Fatalf("%s: ingest: %v", info.Path, err)
	}
	cn, err := c.paths.CalculateNAR(ctx, root)
	if err != nil {
		t.Fatalf("%s: CalculateNAR: %v", info.Path, err)
	}
	if "sha256:"+nixtest.Nix32(cn.NarSha256) != info.NarHash || cn.NarSize != info.NarSize || cn.NarSize != uint64(len(dump)) {
		t.Errorf("%s: CalculateNAR = sha256:%s %d, Nix %s %d", info.Path, nixtest.Nix32(cn.NarSha256), cn.NarSize, info.NarHash, info.NarSize)
	}
	// The NAR itself, rendered from the castore tree.
	var nn nar.Node
	switch {
	case root.GetDirectory() != nil:
		d, err := cst.ToREAPI(ctx, [32]byte(root.GetDirectory().Digest))
		if err != nil {
			t.Fatal(err)
		}
		nn = nar.DirectoryNode(d)
	case root.GetFile() != nil:
		f := root.GetFile()
		nn = nar.FileNode(digest.New(digest.BLAKE3, [32]byte(f.Digest), int64(f.Size)), f.Executable)
	default:
		nn = nar.SymlinkNode(string(root.GetSymlink().Target))
	}
	var buf bytes.Buffer
	if err := nar.Write(ctx, cst.CAS(), digest.BLAKE3, nn, &buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), dump) {
		t.Errorf("%s: the NAR rendered from castore differs from nix-store --dump", info.Path)
	}
	t.Logf("%s: NAR -> castore -> NAR identical (%d bytes)", info.Path, len(dump))
	pi := tvixPathInfo(t, info, root)
	back, err := c.paths.Put(ctx, pi)
	if err != nil {
		t.Fatalf("%s: PathInfoService.Put: %v", info.Path, err)
	}
	if !proto.Equal(back, pi) {
		t.Errorf("%s: Put returned\n%v\nwant\n%v", info.Path, back, pi)
	}
	sp, err := snixPaths.Get(ctx, &snixstorepb.GetPathInfoRequest{ByWhat: &snixstorepb.GetPathInfoRequest_ByOutputHash{ByOutputHash: hash20(t, info.Path)}})
	if err != nil {
		t.Fatalf("%s: snix Get: %v", info.Path, err)
	}
	if !bytes.Equal(mustMarshal(t, sp), mustMarshal(t, pi)) {
		t.Errorf("%s: snix Get returned %v", info.Path, sp)
	}
	// A wrong NAR hash is refused, and stores nothing new.
	bad := proto.CloneOf(pi)
	bad.Narinfo.NarSha256 = make([]byte, 32)
	if _, err := c.paths.Put(ctx, bad); status.Code(err) != codes.InvalidArgument {
		t.Errorf("%s: Put with a wrong NAR hash: %v", info.Path, err)
	}
}
