package digest_test

import (
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

// resourceSeeds are valid and invalid read and write resource names.
var resourceSeeds = []string{
	"",
	"/",
	"blobs",
	"blobs/",
	"blobs/" + sha256ABC + "/3",
	"blobs/" + sha256Empty + "/0",
	"blobs/sha256/" + sha256ABC + "/3",
	"blobs/blake3/" + blake3ABC + "/3",
	"blobs/" + sha256ABC + "/0003",
	"blobs/" + sha256ABC + "/9223372036854775807",
	"blobs/" + sha256ABC + "/9223372036854775808",
	"blobs/" + sha256ABC + "/12345678901234567890",
	"blobs/" + sha256ABC + "/+5",
	"blobs/" + sha256ABC + "/-5",
	"blobs/" + sha256ABC,
	"blobs/" + sha256ABC + "/3/extra",
	"blobs/" + sha1H + "/3",
	"blobs/" + strings.ToUpper(sha256ABC) + "/3",
	"main/blobs/" + sha256ABC + "/3",
	"a/b/c/blobs/blake3/" + blake3ABC + "/3",
	"a/../blobs/" + sha256ABC + "/3",
	"./blobs/" + sha256ABC + "/3",
	"a//blobs/" + sha256ABC + "/3",
	"actions/blobs/" + sha256ABC + "/3",
	"a\x00/blobs/" + sha256ABC + "/3",
	"compressed-blobs/zstd/" + sha256ABC + "/3",
	"compressed-blobs/zstd/blake3/" + blake3ABC + "/3",
	"x/compressed-blobs/zstd/sha256/" + sha256ABC + "/3",
	"compressed-blobs/deflate/" + sha256ABC + "/3",
	"compressed-blobs/identity/" + sha256ABC + "/3",
	"compressed-blobs",
	"uploads",
	"uploads/" + uuid,
	"uploads/" + uuid + "/blobs/" + sha256ABC + "/3",
	"uploads/" + uuid + "/blobs/" + sha256ABC + "/3/meta/data",
	"uploads/" + uuid + "/compressed-blobs/zstd/blake3/" + blake3ABC + "/3",
	"a/b/c/uploads/" + uuid + "/compressed-blobs/zstd/" + sha256ABC + "/3/x",
	"i/uploads/" + uuid + "/blobs/blake3/" + blake3ABC + "/3/",
	"uploads/blobs/" + sha256ABC + "/3",
	"uploads//blobs/" + sha256ABC + "/3",
	"uploads/../blobs/" + sha256ABC + "/3",
	"uploads/" + uuid + "/uploads/" + uuid + "/blobs/" + sha256ABC + "/3",
	"../uploads/" + uuid + "/blobs/" + sha256ABC + "/3",
	"operations/uploads/" + uuid + "/blobs/" + sha256ABC + "/3",
	"uploads/" + uuid + "/compressed-blobs/deflate/" + sha256ABC + "/3",
}

// checkResourceName checks the invariants every successfully parsed
// resource name must satisfy.
func checkResourceName(t *testing.T, input string, rn digest.ResourceName) {
	t.Helper()
	if err := digest.ValidateInstanceName(rn.Instance); err != nil {
		t.Fatalf("%q: parsed instance %q is invalid: %v", input, rn.Instance, err)
	}
	if rn.Instance != "" {
		for _, seg := range strings.Split(rn.Instance, "/") {
			if seg == "" || seg == "." || seg == ".." {
				t.Fatalf("%q: parsed instance %q has segment %q", input, rn.Instance, seg)
			}
		}
		if !strings.HasPrefix(input, rn.Instance+"/") {
			t.Fatalf("%q: parsed instance %q is not a prefix of the name", input, rn.Instance)
		}
	}
	if rn.Compressor != repb.Compressor_IDENTITY && rn.Compressor != repb.Compressor_ZSTD {
		t.Fatalf("%q: unexpected compressor %v", input, rn.Compressor)
	}
	d := rn.Digest
	if d.IsZero() || d.Size() < 0 || (d.Function() != digest.SHA256 && d.Function() != digest.BLAKE3) {
		t.Fatalf("%q: invalid digest %s", input, d.Sprint())
	}
	if !strings.Contains(input, d.Hex()) {
		t.Fatalf("%q: parsed hash %s does not occur in the name", input, d.Hex())
	}
}

func checkInvalidArgument(t *testing.T, input string, err error) {
	t.Helper()
	if c := status.Code(err); c != codes.InvalidArgument {
		t.Fatalf("%q: error has code %v, want InvalidArgument: %v", input, c, err)
	}
	if status.Convert(err).Message() == "" {
		t.Fatalf("%q: error has an empty message", input)
	}
}

func FuzzParseReadResourceName(f *testing.F) {
	for _, s := range resourceSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		rn, err := digest.ParseReadResourceName(name)
		if err != nil {
			checkInvalidArgument(t, name, err)
			if rn != (digest.ResourceName{}) {
				t.Fatalf("%q: non-zero result %+v with error", name, rn)
			}
			return
		}
		if len(name) > digest.MaxResourceNameLength {
			t.Fatalf("%q: accepted a name of %d bytes", name, len(name))
		}
		checkResourceName(t, name, rn)
		if rn.UploadID != "" {
			t.Fatalf("%q: read name has upload id %q", name, rn.UploadID)
		}
		if _, err := digest.ParseWriteResourceName(name); err == nil {
			t.Fatalf("%q: accepted as both a read and a write name", name)
		}
		canon := digest.ReadName(rn.Instance, rn.Digest, rn.Compressor)
		if len(canon) > len(name) {
			t.Fatalf("%q: canonical name %q is longer than the input", name, canon)
		}
		rn2, err := digest.ParseReadResourceName(canon)
		if err != nil {
			t.Fatalf("%q: canonical name %q does not parse: %v", name, canon, err)
		}
		if rn2 != rn {
			t.Fatalf("%q: canonical name %q parses to %+v, want %+v", name, canon, rn2, rn)
		}
		if again := digest.ReadName(rn2.Instance, rn2.Digest, rn2.Compressor); again != canon {
			t.Fatalf("%q: canonical name is not stable: %q then %q", name, canon, again)
		}
	})
}

func FuzzParseWriteResourceName(f *testing.F) {
	for _, s := range resourceSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		rn, err := digest.ParseWriteResourceName(name)
		if err != nil {
			checkInvalidArgument(t, name, err)
			if rn != (digest.ResourceName{}) {
				t.Fatalf("%q: non-zero result %+v with error", name, rn)
			}
			return
		}
		if len(name) > digest.MaxResourceNameLength {
			t.Fatalf("%q: accepted a name of %d bytes", name, len(name))
		}
		checkResourceName(t, name, rn)
		if rn.UploadID == "" || rn.UploadID == "." || rn.UploadID == ".." || strings.Contains(rn.UploadID, "/") || len(rn.UploadID) > 128 {
			t.Fatalf("%q: invalid upload id %q", name, rn.UploadID)
		}
		if _, err := digest.ParseReadResourceName(name); err == nil {
			t.Fatalf("%q: accepted as both a read and a write name", name)
		}
		// Metadata is dropped on re-rendering; all parsed fields survive.
		canon := digest.WriteName(rn.Instance, rn.UploadID, rn.Digest, rn.Compressor)
		if len(canon) > len(name) {
			t.Fatalf("%q: canonical name %q is longer than the input", name, canon)
		}
		rn2, err := digest.ParseWriteResourceName(canon)
		if err != nil {
			t.Fatalf("%q: canonical name %q does not parse: %v", name, canon, err)
		}
		if rn2 != rn {
			t.Fatalf("%q: canonical name %q parses to %+v, want %+v", name, canon, rn2, rn)
		}
		// The blob part of the write name is a valid read name.
		read := digest.ReadName(rn.Instance, rn.Digest, rn.Compressor)
		rr, err := digest.ParseReadResourceName(read)
		if err != nil {
			t.Fatalf("%q: read name %q does not parse: %v", name, read, err)
		}
		rr.UploadID = rn.UploadID
		if rr != rn {
			t.Fatalf("%q: read name %q parses to %+v, want %+v", name, read, rr, rn)
		}
	})
}

// isLowerHex reports whether s consists of lowercase hex digits only.
func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

func FuzzParse(f *testing.F) {
	f.Add(uint8(digest.SHA256), sha256Empty, int64(0))
	f.Add(uint8(digest.SHA256), sha256ABC, int64(3))
	f.Add(uint8(digest.BLAKE3), blake3Empty, int64(0))
	f.Add(uint8(digest.BLAKE3), blake3ABC, int64(3))
	f.Add(uint8(digest.BLAKE3), blake3ABC, int64(1<<63-1))
	f.Add(uint8(digest.SHA256), sha256ABC, int64(-1))
	f.Add(uint8(digest.SHA256), sha256ABC, int64(-1<<63))
	f.Add(uint8(digest.SHA256), strings.ToUpper(sha256ABC), int64(3))
	f.Add(uint8(digest.SHA256), sha1H, int64(3))
	f.Add(uint8(digest.SHA256), "", int64(0))
	f.Add(uint8(digest.SHA256), "z"+sha256ABC[1:], int64(3))
	f.Add(uint8(digest.BLAKE3), sha256ABC+"0", int64(3))
	f.Add(uint8(digest.BLAKE3), "é"+sha256ABC[2:], int64(3))
	f.Add(uint8(0), sha256ABC, int64(3))
	f.Add(uint8(3), sha256ABC, int64(3))
	f.Fuzz(func(t *testing.T, fnb uint8, h string, size int64) {
		fn := digest.Function(fnb)
		d, err := digest.Parse(fn, h, size)
		valid := (fn == digest.SHA256 || fn == digest.BLAKE3) && len(h) == 2*digest.HashSize && isLowerHex(h) && size >= 0
		if err != nil {
			checkInvalidArgument(t, h, err)
			if valid {
				t.Fatalf("Parse(%v, %q, %d) rejected a valid digest: %v", fn, h, size, err)
			}
			if !d.IsZero() {
				t.Fatalf("Parse returned non-zero %s with error", d.Sprint())
			}
			if fn == digest.SHA256 || fn == digest.BLAKE3 {
				_, perr := digest.FromProto(fn, &repb.Digest{Hash: h, SizeBytes: size})
				if status.Code(perr) != codes.InvalidArgument {
					t.Fatalf("FromProto accepted what Parse rejected: %v", perr)
				}
			}
			return
		}
		if !valid {
			t.Fatalf("Parse(%v, %q, %d) accepted an invalid digest", fn, h, size)
		}
		if d.Function() != fn || d.Hex() != h || d.Size() != size || d.IsZero() {
			t.Fatalf("Parse(%v, %q, %d) = %s", fn, h, size, d.Sprint())
		}
		if d2 := digest.New(fn, d.Hash(), size); d2 != d {
			t.Fatalf("New(components of %s) = %s", d.Sprint(), d2.Sprint())
		}
		if d2, err := digest.FromProto(fn, d.Proto()); err != nil || d2 != d {
			t.Fatalf("FromProto(Proto()) of %s = %s, %v", d.Sprint(), d2.Sprint(), err)
		}
		for _, c := range []repb.Compressor_Value{repb.Compressor_IDENTITY, repb.Compressor_ZSTD} {
			want := digest.ResourceName{Instance: "i", Compressor: c, Digest: d}
			if rn, err := digest.ParseReadResourceName(digest.ReadName("i", d, c)); err != nil || rn != want {
				t.Fatalf("read name round trip of %s = %+v, %v", d.Sprint(), rn, err)
			}
		}
	})
}
