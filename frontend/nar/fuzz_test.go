package nar

import (
	"bytes"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/digest"
)

// FuzzParseOutputHash checks that ParseOutputHash never panics and that
// what it accepts prints back to a string it parses to the same hash.
func FuzzParseOutputHash(f *testing.F) {
	for _, c := range outputHashCases() {
		f.Add(c[0], c[1])
	}
	f.Fuzz(func(t *testing.T, h, algo string) {
		got, err := ParseOutputHash(h, algo)
		if err != nil {
			return
		}
		again, err := ParseOutputHash(got.String(), got.Algo().String())
		if err != nil || !bytes.Equal(again.Digest(), got.Digest()) {
			t.Fatalf("%q %q -> %s -> %v, %v", h, algo, got, again, err)
		}
	})
}

// FuzzSplitTree checks that malformed Trees and Directory messages are
// errors, not panics.
func FuzzSplitTree(f *testing.F) {
	sub, _ := proto.Marshal(&repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: digest.Compute(digest.SHA256, []byte("x")).Proto()}}})
	tree, _ := proto.Marshal(&repb.Tree{Root: &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: digest.Compute(digest.SHA256, sub).Proto()}}}, Children: []*repb.Directory{{}}})
	f.Add(tree)
	f.Add([]byte{0x0a, 0x02, 0x0a, 0x00})
	f.Fuzz(func(t *testing.T, data []byte) {
		dirs, err := splitTree(data)
		if err != nil {
			return
		}
		for _, d := range dirs {
			var pd repb.Directory
			if proto.Unmarshal(d, &pd) == nil {
				entries(digest.SHA256, &pd)
			}
		}
	})
}
