package grpcservers_test

import (
	"fmt"
	"io"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

type treePage struct {
	dirs  []*repb.Directory
	token string
}

// getTreeStream reads one GetTree stream to its end.
func (e *env) getTreeStream(t testing.TB, req *repb.GetTreeRequest) ([]treePage, error) {
	t.Helper()
	stream, err := e.cas.GetTree(testCtx(t), req)
	if err != nil {
		return nil, err
	}
	var pages []treePage
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return pages, nil
		}
		if err != nil {
			return pages, err
		}
		pages = append(pages, treePage{resp.Directories, resp.NextPageToken})
	}
}

// getTreeAll fetches a whole tree, following page tokens across requests
// when a stream ends with one.
func (e *env) getTreeAll(t testing.TB, req *repb.GetTreeRequest) []treePage {
	t.Helper()
	req = proto.Clone(req).(*repb.GetTreeRequest)
	var all []treePage
	for range 1000 {
		pages, err := e.getTreeStream(t, req)
		if err != nil {
			t.Fatalf("GetTree(token %q): %v", req.PageToken, err)
		}
		if len(pages) == 0 {
			t.Fatalf("GetTree(token %q): empty stream", req.PageToken)
		}
		all = append(all, pages...)
		last := pages[len(pages)-1].token
		if last == "" {
			return all
		}
		req.PageToken = last
	}
	t.Fatalf("GetTree: too many pages")
	return nil
}

func flatten(pages []treePage) []*repb.Directory {
	var dirs []*repb.Directory
	for _, p := range pages {
		dirs = append(dirs, p.dirs...)
	}
	return dirs
}

func equalDirs(t testing.TB, what string, got, want []*repb.Directory) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d directories, want %d", what, len(got), len(want))
	}
	for i := range got {
		if !proto.Equal(got[i], want[i]) {
			t.Fatalf("%s: directory %d is %v, want %v", what, i, got[i], want[i])
		}
	}
}

func TestGetTree(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		for _, instance := range []string{"", "a/b"} {
			file := func(name string) *repb.FileNode {
				data := []byte("contents of " + name + " " + instance)
				e.batchUpload(t, instance, fc, data)
				return &repb.FileNode{Name: name, Digest: fc.pd(data)}
			}
			dirNode := func(name string, d *repb.Directory, upload bool) *repb.DirectoryNode {
				data, err := proto.MarshalOptions{Deterministic: true}.Marshal(d)
				if err != nil {
					t.Fatal(err)
				}
				if upload {
					e.batchUpload(t, instance, fc, data)
				}
				return &repb.DirectoryNode{Name: name, Digest: fc.pd(data)}
			}
			// root/{README, a/{x, c/{y}}, b/{d/{z}, m (missing)}}
			c := &repb.Directory{Files: []*repb.FileNode{file("y")}}
			d := &repb.Directory{Files: []*repb.FileNode{file("z")}}
			m := &repb.Directory{Files: []*repb.FileNode{file("never")}}
			a := &repb.Directory{Files: []*repb.FileNode{file("x")}, Directories: []*repb.DirectoryNode{dirNode("c", c, true)}}
			b := &repb.Directory{Directories: []*repb.DirectoryNode{dirNode("d", d, true), dirNode("m", m, false)}}
			root := &repb.Directory{
				Files:       []*repb.FileNode{file("README")},
				Directories: []*repb.DirectoryNode{dirNode("a", a, true), dirNode("b", b, true)},
			}
			rootD := dirNode("", root, true).Digest
			want := []*repb.Directory{root, a, b, c, d}

			req := &repb.GetTreeRequest{InstanceName: instance, DigestFunction: fc.proto, RootDigest: rootD, PageSize: 1}
			pages := e.getTreeAll(t, req)
			for i, p := range pages {
				if len(p.dirs) > 1 {
					t.Fatalf("page %d has %d directories with page_size 1", i, len(p.dirs))
				}
			}
			equalDirs(t, "GetTree page_size 1", flatten(pages), want)

			// Every page token resumes the tree where its page ended.
			seen := 0
			tokens := 0
			for _, p := range pages {
				seen += len(p.dirs)
				if p.token == "" {
					continue
				}
				tokens++
				rest := e.getTreeAll(t, &repb.GetTreeRequest{InstanceName: instance, DigestFunction: fc.proto, RootDigest: rootD, PageSize: 1, PageToken: p.token})
				equalDirs(t, fmt.Sprintf("GetTree from token %q", p.token), flatten(rest), want[seen:])
			}
			if tokens < len(want)-1 {
				t.Fatalf("GetTree page_size 1 over %d directories gave %d page tokens", len(want), tokens)
			}

			for _, size := range []int32{0, 2, 3, 100} {
				req := &repb.GetTreeRequest{InstanceName: instance, DigestFunction: fc.proto, RootDigest: rootD, PageSize: size}
				pages := e.getTreeAll(t, req)
				for i, p := range pages {
					if size > 0 && len(p.dirs) > int(size) {
						t.Fatalf("page_size %d: page %d has %d directories", size, i, len(p.dirs))
					}
				}
				equalDirs(t, fmt.Sprintf("GetTree page_size %d", size), flatten(pages), want)
			}

			// A subtree: b's tree, with m missing.
			bD := root.Directories[1].Digest
			equalDirs(t, "GetTree(b)", flatten(e.getTreeAll(t, &repb.GetTreeRequest{InstanceName: instance, DigestFunction: fc.proto, RootDigest: bD})), []*repb.Directory{b, d})

			// The root itself missing is NOT_FOUND.
			_, err := e.getTreeStream(t, &repb.GetTreeRequest{InstanceName: instance, DigestFunction: fc.proto, RootDigest: b.Directories[1].Digest})
			wantCode(t, err, codes.NotFound, "GetTree of a missing root")

			for _, tok := range []string{"x", "-1", "1.5", "99999999999999999999"} {
				_, err := e.getTreeStream(t, &repb.GetTreeRequest{InstanceName: instance, DigestFunction: fc.proto, RootDigest: rootD, PageToken: tok})
				wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("GetTree with page token %q", tok))
			}
		}
	})
}

// TestGetTreeLarge fetches a tree of more than 4 MiB of directories the way
// common clients (the remote-apis-sdks, for one) do: one stream, read to
// its end, with gRPC's default 4 MiB receive limit.
func TestGetTreeLarge(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		// Long names make big directories of few nodes, which keeps
		// (de)serialisation cheap.
		const ndirs, nfiles = 60, 100
		long := strings.Repeat("n", 800)
		empty := fc.pd(nil)
		root := &repb.Directory{}
		want := []*repb.Directory{root}
		var blobs [][]byte
		total := 0
		for i := range ndirs {
			d := &repb.Directory{}
			for j := range nfiles {
				d.Files = append(d.Files, &repb.FileNode{Name: fmt.Sprintf("file-%03d-%04d-%s", i, j, long), Digest: empty})
			}
			data, err := proto.MarshalOptions{Deterministic: true}.Marshal(d)
			if err != nil {
				t.Fatal(err)
			}
			total += len(data)
			blobs = append(blobs, data)
			want = append(want, d)
			root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%03d", i), Digest: fc.pd(data)})
		}
		if total <= 4<<20 {
			t.Fatalf("tree is only %d bytes", total)
		}
		e.batchUpload(t, "", fc, blobs...)
		rootD := e.uploadProto(t, "", fc, root)

		pages, err := e.getTreeStream(t, &repb.GetTreeRequest{DigestFunction: fc.proto, RootDigest: rootD})
		if err != nil {
			t.Fatalf("GetTree: %v", err)
		}
		equalDirs(t, "GetTree, one stream", flatten(pages), want)
		if last := pages[len(pages)-1].token; last != "" {
			t.Fatalf("last page has token %q", last)
		}
		// Following tokens across requests gives the same.
		equalDirs(t, "GetTree, page_size 7", flatten(e.getTreeAll(t, &repb.GetTreeRequest{DigestFunction: fc.proto, RootDigest: rootD, PageSize: 7})), want)
	})
}
