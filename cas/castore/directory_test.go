package castore_test

import (
	"encoding/hex"
	"strings"
	"testing"

	"tvixfarm/cas/castore"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The fixtures of Tvix's castore tests, as the reference's Appendix A
// gives them.
var (
	emptyDigest = castore.EmptyDigest[:]
	withKeep    = &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte(".keep"), Digest: emptyDigest}}}
)

func complicated(t testing.TB, keepSize uint64) *castorepb.Directory {
	h, _, err := castore.Digest(withKeep)
	if err != nil {
		t.Fatal(err)
	}
	return &castorepb.Directory{
		Directories: []*castorepb.DirectoryNode{{Name: []byte("keep"), Digest: h[:], Size: keepSize}},
		Files:       []*castorepb.FileNode{{Name: []byte(".keep"), Digest: emptyDigest}},
		Symlinks:    []*castorepb.SymlinkNode{{Name: []byte("aa"), Target: []byte("/nix/store/somewhereelse")}},
	}
}

func TestVectors(t *testing.T) {
	if got := hex.EncodeToString(castore.EmptyDigest[:]); got != "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262" {
		t.Errorf("empty digest %s", got)
	}
	h, enc, err := castore.Digest(&castorepb.Directory{})
	if err != nil || len(enc) != 0 || h != castore.EmptyDigest {
		t.Errorf("empty directory: %x %x %v", h, enc, err)
	}
	h, enc, err = castore.Digest(withKeep)
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(enc); got != "12290a052e6b6565701220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262" {
		t.Errorf("DIRECTORY_WITH_KEEP encoding %s", got)
	}
	if got := hex.EncodeToString(h[:]); got != "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e" {
		t.Errorf("DIRECTORY_WITH_KEEP digest %s", got)
	}
	if sz, _ := castore.Size(withKeep); sz != 2 {
		t.Errorf("Size(DIRECTORY_WITH_KEEP) = %d, want 2 (2N+Σ)", sz)
	}
	h, _, _ = castore.Digest(complicated(t, 2))
	if got := hex.EncodeToString(h[:]); got != "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb" {
		t.Errorf("DIRECTORY_COMPLICATED (size 2) digest %s", got)
	}
	h, _, _ = castore.Digest(complicated(t, 1))
	if got := hex.EncodeToString(h[:]); got != "3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a" {
		t.Errorf("DIRECTORY_COMPLICATED (size 1) digest %s", got)
	}
	if sz, _ := castore.Size(complicated(t, 2)); sz != 8 {
		t.Errorf("Size(DIRECTORY_COMPLICATED) = %d, want 8", sz)
	}
}

func TestValidate(t *testing.T) {
	d32 := emptyDigest
	file := func(name string) *castorepb.FileNode { return &castorepb.FileNode{Name: []byte(name), Digest: d32} }
	for _, tc := range []struct {
		name string
		dir  *castorepb.Directory
		want string // "" for valid
	}{
		{"empty", &castorepb.Directory{}, ""},
		{"complicated", complicated(t, 2), ""},
		{"non-utf8 name", &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte{0xff, 0xfe}, Digest: d32}}}, ""},
		{"255 bytes", &castorepb.Directory{Files: []*castorepb.FileNode{file(strings.Repeat("a", 255))}}, ""},
		{"256 bytes", &castorepb.Directory{Files: []*castorepb.FileNode{file(strings.Repeat("a", 256))}}, "at most 255"},
		{"empty name", &castorepb.Directory{Files: []*castorepb.FileNode{file("")}}, "empty name"},
		{"dot", &castorepb.Directory{Files: []*castorepb.FileNode{file(".")}}, `name "."`},
		{"dotdot", &castorepb.Directory{Directories: []*castorepb.DirectoryNode{{Name: []byte(".."), Digest: d32}}}, `name ".."`},
		{"slash", &castorepb.Directory{Files: []*castorepb.FileNode{file("a/b")}}, "contains '/'"},
		{"nul", &castorepb.Directory{Files: []*castorepb.FileNode{file("a\x00b")}}, "contains NUL"},
		{"unsorted", &castorepb.Directory{Files: []*castorepb.FileNode{file("b"), file("a")}}, "wrong sorting"},
		{"duplicate", &castorepb.Directory{Files: []*castorepb.FileNode{file("a"), file("a")}}, "duplicate name"},
		{"duplicate across lists", &castorepb.Directory{Files: []*castorepb.FileNode{file("a")}, Symlinks: []*castorepb.SymlinkNode{{Name: []byte("a"), Target: []byte("x")}}}, "duplicate name (also a file)"},
		{"short digest", &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte("a"), Digest: d32[:31]}}}, "invalid digest length 31"},
		{"short dir digest", &castorepb.Directory{Directories: []*castorepb.DirectoryNode{{Name: []byte("a")}}}, "invalid digest length 0"},
		{"empty target", &castorepb.Directory{Symlinks: []*castorepb.SymlinkNode{{Name: []byte("a")}}}, "empty symlink target"},
		{"nul target", &castorepb.Directory{Symlinks: []*castorepb.SymlinkNode{{Name: []byte("a"), Target: []byte("x\x00")}}}, "NUL"},
		{"long target", &castorepb.Directory{Symlinks: []*castorepb.SymlinkNode{{Name: []byte("a"), Target: []byte(strings.Repeat("x", 4096))}}}, "at most 4095"},
		{"size overflow", &castorepb.Directory{Directories: []*castorepb.DirectoryNode{{Name: []byte("a"), Digest: d32, Size: 1<<64 - 1}}}, "overflows"},
	} {
		err := castore.Validate(tc.dir)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestDigestDropsUnknownFields(t *testing.T) {
	d := &castorepb.Directory{}
	d.ProtoReflect().SetUnknown([]byte{0x78, 0x01}) // field 15, varint 1
	h, _, err := castore.Digest(d)
	if err != nil || h != castore.EmptyDigest {
		t.Fatalf("digest with unknown fields: %x, %v", h, err)
	}
}
