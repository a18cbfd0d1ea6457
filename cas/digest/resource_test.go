package digest_test

import (
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"tvixfarm/cas/digest"
)

const (
	uuid  = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
	sha1H = "a9993e364706816aba3e25717850c26c9cd0d89d"
)

var (
	shaD    = digest.Compute(digest.SHA256, []byte("abc"))
	blakeD  = digest.Compute(digest.BLAKE3, []byte("abc"))
	shaD0   = digest.Empty(digest.SHA256)
	blakeD0 = digest.Empty(digest.BLAKE3)
)

func TestParseReadResourceName(t *testing.T) {
	id, zstd := repb.Compressor_IDENTITY, repb.Compressor_ZSTD
	for _, tc := range []struct {
		name string
		want digest.ResourceName
	}{
		{"blobs/" + sha256ABC + "/3", digest.ResourceName{Compressor: id, Digest: shaD}},
		{"blobs/" + sha256Empty + "/0", digest.ResourceName{Compressor: id, Digest: shaD0}},
		{"main/blobs/" + sha256ABC + "/3", digest.ResourceName{Instance: "main", Compressor: id, Digest: shaD}},
		{"a/b/c/blobs/" + sha256ABC + "/3", digest.ResourceName{Instance: "a/b/c", Compressor: id, Digest: shaD}},
		{"blobs/sha256/" + sha256ABC + "/3", digest.ResourceName{Compressor: id, Digest: shaD}},
		{"x/blobs/sha256/" + sha256ABC + "/3", digest.ResourceName{Instance: "x", Compressor: id, Digest: shaD}},
		{"blobs/blake3/" + blake3ABC + "/3", digest.ResourceName{Compressor: id, Digest: blakeD}},
		{"blobs/blake3/" + blake3Empty + "/0", digest.ResourceName{Compressor: id, Digest: blakeD0}},
		{"a/b/c/blobs/blake3/" + blake3ABC + "/3", digest.ResourceName{Instance: "a/b/c", Compressor: id, Digest: blakeD}},
		{"compressed-blobs/zstd/" + sha256ABC + "/3", digest.ResourceName{Compressor: zstd, Digest: shaD}},
		{"compressed-blobs/zstd/sha256/" + sha256ABC + "/3", digest.ResourceName{Compressor: zstd, Digest: shaD}},
		{"compressed-blobs/zstd/blake3/" + blake3ABC + "/3", digest.ResourceName{Compressor: zstd, Digest: blakeD}},
		{"a/b/compressed-blobs/zstd/blake3/" + blake3ABC + "/3", digest.ResourceName{Instance: "a/b", Compressor: zstd, Digest: blakeD}},
		// Instance segments merely resembling keywords are fine.
		{"my.instance/...x/blob/blobs/" + sha256ABC + "/3", digest.ResourceName{Instance: "my.instance/...x/blob", Compressor: id, Digest: shaD}},
		{"sha256/blake3/zstd/blobs/" + sha256ABC + "/3", digest.ResourceName{Instance: "sha256/blake3/zstd", Compressor: id, Digest: shaD}},
		// Leading zeros in the size are accepted.
		{"blobs/" + sha256ABC + "/0003", digest.ResourceName{Compressor: id, Digest: shaD}},
		// The largest size.
		{"blobs/" + sha256ABC + "/9223372036854775807", digest.ResourceName{Compressor: id, Digest: mustParse(t, digest.SHA256, sha256ABC, 1<<63-1)}},
		// The hash is not checked against the function beyond its length,
		// so a sha256-looking hash under blake3 is a valid blake3 digest.
		{"blobs/blake3/" + sha256ABC + "/3", digest.ResourceName{Compressor: id, Digest: mustParse(t, digest.BLAKE3, sha256ABC, 3)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := digest.ParseReadResourceName(tc.name)
			if err != nil {
				t.Fatalf("ParseReadResourceName: %v", err)
			}
			if got != tc.want {
				t.Fatalf("ParseReadResourceName = %+v, want %+v", got, tc.want)
			}
			if got.UploadID != "" {
				t.Errorf("read name has UploadID %q", got.UploadID)
			}
			// A read name is not a write name.
			if _, err := digest.ParseWriteResourceName(tc.name); err == nil {
				t.Errorf("ParseWriteResourceName(%q) accepted a read name", tc.name)
			} else {
				wantInvalid(t, err)
			}
		})
	}
}

func TestParseWriteResourceName(t *testing.T) {
	id, zstd := repb.Compressor_IDENTITY, repb.Compressor_ZSTD
	for _, tc := range []struct {
		name string
		want digest.ResourceName
	}{
		{"uploads/" + uuid + "/blobs/" + sha256ABC + "/3", digest.ResourceName{UploadID: uuid, Compressor: id, Digest: shaD}},
		{"main/uploads/" + uuid + "/blobs/" + sha256ABC + "/3", digest.ResourceName{Instance: "main", UploadID: uuid, Compressor: id, Digest: shaD}},
		{"a/b/c/uploads/" + uuid + "/blobs/" + sha256ABC + "/3", digest.ResourceName{Instance: "a/b/c", UploadID: uuid, Compressor: id, Digest: shaD}},
		{"uploads/" + uuid + "/blobs/sha256/" + sha256ABC + "/3", digest.ResourceName{UploadID: uuid, Compressor: id, Digest: shaD}},
		{"uploads/" + uuid + "/blobs/blake3/" + blake3ABC + "/3", digest.ResourceName{UploadID: uuid, Compressor: id, Digest: blakeD}},
		{"uploads/" + uuid + "/compressed-blobs/zstd/" + sha256ABC + "/3", digest.ResourceName{UploadID: uuid, Compressor: zstd, Digest: shaD}},
		{"a/b/c/uploads/" + uuid + "/compressed-blobs/zstd/blake3/" + blake3ABC + "/3", digest.ResourceName{Instance: "a/b/c", UploadID: uuid, Compressor: zstd, Digest: blakeD}},
		// Optional trailing metadata is ignored.
		{"uploads/" + uuid + "/blobs/" + sha256ABC + "/3/foo", digest.ResourceName{UploadID: uuid, Compressor: id, Digest: shaD}},
		{"uploads/" + uuid + "/blobs/" + sha256ABC + "/3/foo/bar/baz.txt", digest.ResourceName{UploadID: uuid, Compressor: id, Digest: shaD}},
		{"i/uploads/" + uuid + "/compressed-blobs/zstd/blake3/" + blake3ABC + "/3/meta/data", digest.ResourceName{Instance: "i", UploadID: uuid, Compressor: zstd, Digest: blakeD}},
		// Upload ids are opaque, not necessarily UUIDs.
		{"uploads/x/blobs/" + sha256Empty + "/0", digest.ResourceName{UploadID: "x", Compressor: id, Digest: shaD0}},
		{"uploads/blobs/blobs/" + sha256Empty + "/0", digest.ResourceName{UploadID: "blobs", Compressor: id, Digest: shaD0}},
		{"uploads/" + strings.Repeat("u", 128) + "/blobs/" + sha256Empty + "/0", digest.ResourceName{UploadID: strings.Repeat("u", 128), Compressor: id, Digest: shaD0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := digest.ParseWriteResourceName(tc.name)
			if err != nil {
				t.Fatalf("ParseWriteResourceName: %v", err)
			}
			if got != tc.want {
				t.Fatalf("ParseWriteResourceName = %+v, want %+v", got, tc.want)
			}
			// A write name is not a read name.
			if _, err := digest.ParseReadResourceName(tc.name); err == nil {
				t.Errorf("ParseReadResourceName(%q) accepted a write name", tc.name)
			} else {
				wantInvalid(t, err)
			}
		})
	}
}

func TestParseReadResourceNameErrors(t *testing.T) {
	long := strings.Repeat("i", digest.MaxResourceNameLength) + "/blobs/" + sha256ABC + "/3"
	for _, tc := range []struct {
		desc string
		name string
		want []string
	}{
		{"empty", "", []string{"empty path segment"}},
		{"no keyword", "main", []string{"no \"blobs\""}},
		{"only slash", "/", []string{"empty path segment"}},
		{"leading slash", "/blobs/" + sha256ABC + "/3", []string{"empty path segment"}},
		{"double slash in instance", "a//b/blobs/" + sha256ABC + "/3", []string{"empty path segment"}},
		{"trailing slash in instance", "a/" + "/blobs/" + sha256ABC + "/3", []string{"empty path segment"}},
		{"dotdot instance", "../blobs/" + sha256ABC + "/3", []string{`".."`}},
		{"dotdot inner instance", "a/../b/blobs/" + sha256ABC + "/3", []string{`".."`}},
		{"dot instance", "./blobs/" + sha256ABC + "/3", []string{`"."`}},
		{"dot inner instance", "a/./blobs/" + sha256ABC + "/3", []string{`"."`}},
		{"NUL in instance", "a\x00b/blobs/" + sha256ABC + "/3", []string{"NUL"}},
		{"reserved actions", "actions/blobs/" + sha256ABC + "/3", []string{"reserved keyword", `"actions"`}},
		{"reserved actionResults", "a/actionResults/blobs/" + sha256ABC + "/3", []string{"reserved keyword", `"actionResults"`}},
		{"reserved operations", "operations/x/blobs/" + sha256ABC + "/3", []string{"reserved keyword", `"operations"`}},
		{"reserved capabilities", "capabilities/blobs/" + sha256ABC + "/3", []string{"reserved keyword", `"capabilities"`}},
		{"uploads in read name", "uploads/" + uuid + "/blobs/" + sha256ABC + "/3", []string{`got "uploads"`}},
		{"blobs only", "blobs", []string{"{hash}/{size}"}},
		{"blobs slash", "blobs/", []string{"{hash}/{size}"}},
		{"missing size", "blobs/" + sha256ABC, []string{"{hash}/{size}"}},
		{"missing size with fn", "blobs/blake3/" + blake3ABC, []string{"{hash}/{size}"}},
		{"empty size", "blobs/" + sha256ABC + "/", []string{"invalid size"}},
		{"non-numeric size", "blobs/" + sha256ABC + "/abc", []string{"invalid size", `"abc"`}},
		{"hex size", "blobs/" + sha256ABC + "/0x3", []string{"invalid size"}},
		{"plus size", "blobs/" + sha256ABC + "/+5", []string{"invalid size", `"+5"`}},
		{"negative size", "blobs/" + sha256ABC + "/-5", []string{"invalid size", `"-5"`}},
		{"space size", "blobs/" + sha256ABC + "/ 5", []string{"invalid size"}},
		{"overflowing 19-digit size", "blobs/" + sha256ABC + "/9223372036854775808", []string{"invalid size"}},
		{"19 nines size", "blobs/" + sha256ABC + "/9999999999999999999", []string{"invalid size"}},
		{"20-digit size", "blobs/" + sha256ABC + "/12345678901234567890", []string{"invalid size"}},
		{"20-digit zero-padded size", "blobs/" + sha256ABC + "/00000000000000000003", []string{"invalid size"}},
		{"sha1 hash", "blobs/" + sha1H + "/3", []string{"length 40", "64 hex digits"}},
		{"sha1 hash with fn", "blobs/sha1/" + sha1H + "/3", []string{"invalid size"}},
		{"md5 segment", "blobs/md5/" + sha256ABC + "/3", []string{"invalid size"}},
		{"uppercase hash", "blobs/" + strings.ToUpper(sha256ABC) + "/3", []string{"not lowercase hex"}},
		{"uppercase fn", "blobs/BLAKE3/" + blake3ABC + "/3", []string{"invalid size"}},
		{"non-hex hash", "blobs/" + "z" + sha256ABC[1:] + "/3", []string{"not lowercase hex"}},
		{"trailing segment", "blobs/" + sha256ABC + "/3/extra", []string{"trailing segments"}},
		{"trailing slash", "blobs/" + sha256ABC + "/3/", []string{"trailing segments"}},
		{"compressed trailing", "compressed-blobs/zstd/" + sha256ABC + "/3/x", []string{"trailing segments"}},
		{"missing compressor", "compressed-blobs", []string{"missing compressor"}},
		{"compressor only", "compressed-blobs/zstd", []string{"{hash}/{size}"}},
		{"unknown compressor", "compressed-blobs/deflate/" + sha256ABC + "/3", []string{"compressor", `"deflate"`, "not supported"}},
		{"identity compressor", "compressed-blobs/identity/" + sha256ABC + "/3", []string{"compressor", `"identity"`, "not supported"}},
		{"uppercase compressor", "compressed-blobs/ZSTD/" + sha256ABC + "/3", []string{`"ZSTD"`, "not supported"}},
		{"brotli compressor", "compressed-blobs/brotli/" + sha256ABC + "/3", []string{`"brotli"`}},
		{"compressor missing", "compressed-blobs/" + sha256ABC + "/3", []string{"not supported"}},
		{"compressed-blobs after blobs", "blobs/compressed-blobs/zstd/" + sha256ABC + "/3", []string{"invalid size"}},
		{"overlong", long, []string{"longer than 4096"}},
		{"overlong garbage", strings.Repeat("/", digest.MaxResourceNameLength+1), []string{"longer than 4096"}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			rn, err := digest.ParseReadResourceName(tc.name)
			wantInvalid(t, err, tc.want...)
			if rn != (digest.ResourceName{}) {
				t.Errorf("ParseReadResourceName returned %+v with an error", rn)
			}
			if err != nil && len(err.Error()) > 1000 {
				t.Errorf("error message is %d bytes long", len(err.Error()))
			}
		})
	}
}

func TestParseWriteResourceNameErrors(t *testing.T) {
	blob := "/blobs/" + sha256ABC + "/3"
	long := "uploads/" + uuid + "/blobs/" + sha256ABC + "/3/" + strings.Repeat("m", digest.MaxResourceNameLength)
	for _, tc := range []struct {
		desc string
		name string
		want []string
	}{
		{"empty", "", []string{"empty path segment"}},
		{"read name", "blobs/" + sha256ABC + "/3", []string{`"uploads/{uuid}/"`}},
		{"read name with instance", "a/b/blobs/" + sha256ABC + "/3", []string{`"uploads/{uuid}/"`}},
		{"missing uuid", "uploads" + blob, []string{`expected "blobs" or "compressed-blobs"`}},
		{"empty uuid", "uploads/" + blob, []string{"upload id"}},
		{"uploads only", "uploads", []string{"upload id"}},
		{"uploads slash", "uploads/", []string{"upload id"}},
		{"uuid only", "uploads/" + uuid, []string{"upload id"}},
		{"uuid slash", "uploads/" + uuid + "/", []string{"expected \"blobs\" or \"compressed-blobs\""}},
		{"dot uuid", "uploads/." + blob, []string{"upload id"}},
		{"dotdot uuid", "uploads/.." + blob, []string{"upload id"}},
		{"overlong uuid", "uploads/" + strings.Repeat("u", 129) + blob, []string{"upload id"}},
		{"dotdot instance", "../uploads/" + uuid + blob, []string{`".."`}},
		{"dot instance", "a/./uploads/" + uuid + blob, []string{`"."`}},
		{"empty instance segment", "a//uploads/" + uuid + blob, []string{"empty path segment"}},
		{"leading slash", "/uploads/" + uuid + blob, []string{"empty path segment"}},
		{"reserved instance", "operations/uploads/" + uuid + blob, []string{"reserved keyword"}},
		{"reserved actions instance", "x/actions/uploads/" + uuid + blob, []string{"reserved keyword", `"actions"`}},
		{"missing blobs", "uploads/" + uuid + "/" + sha256ABC + "/3", []string{"expected \"blobs\" or \"compressed-blobs\""}},
		{"nested uploads", "uploads/" + uuid + "/uploads/" + uuid + blob, []string{`got "uploads"`}},
		{"missing size", "uploads/" + uuid + "/blobs/" + sha256ABC, []string{"{hash}/{size}"}},
		{"empty size", "uploads/" + uuid + "/blobs/" + sha256ABC + "/", []string{"invalid size"}},
		{"non-numeric size", "uploads/" + uuid + "/blobs/" + sha256ABC + "/three", []string{"invalid size"}},
		{"plus size", "uploads/" + uuid + "/blobs/" + sha256ABC + "/+5", []string{"invalid size", `"+5"`}},
		{"negative size", "uploads/" + uuid + "/blobs/" + sha256ABC + "/-1", []string{"invalid size"}},
		{"20-digit size", "uploads/" + uuid + "/blobs/" + sha256ABC + "/12345678901234567890", []string{"invalid size"}},
		{"sha1 hash", "uploads/" + uuid + "/blobs/" + sha1H + "/3", []string{"length 40"}},
		{"uppercase hash", "uploads/" + uuid + "/blobs/" + strings.ToUpper(sha256ABC) + "/3", []string{"not lowercase hex"}},
		{"unknown compressor", "uploads/" + uuid + "/compressed-blobs/deflate/" + sha256ABC + "/3", []string{`"deflate"`, "not supported"}},
		{"identity compressor", "uploads/" + uuid + "/compressed-blobs/identity/" + sha256ABC + "/3", []string{`"identity"`, "not supported"}},
		{"missing compressor", "uploads/" + uuid + "/compressed-blobs", []string{"missing compressor"}},
		{"overlong", long, []string{"longer than 4096"}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			rn, err := digest.ParseWriteResourceName(tc.name)
			wantInvalid(t, err, tc.want...)
			if rn != (digest.ResourceName{}) {
				t.Errorf("ParseWriteResourceName returned %+v with an error", rn)
			}
		})
	}
}

func TestResourceNameLengthLimit(t *testing.T) {
	suffix := "/blobs/" + sha256ABC + "/3"
	inst := strings.Repeat("i", digest.MaxResourceNameLength-len(suffix))
	name := inst + suffix
	if len(name) != digest.MaxResourceNameLength {
		t.Fatalf("test bug: len = %d", len(name))
	}
	rn, err := digest.ParseReadResourceName(name)
	if err != nil {
		t.Fatalf("name of exactly MaxResourceNameLength bytes: %v", err)
	}
	if rn.Instance != inst {
		t.Errorf("Instance has length %d, want %d", len(rn.Instance), len(inst))
	}
	_, err = digest.ParseReadResourceName("i" + name)
	wantInvalid(t, err, "longer than")

	wsuffix := "/uploads/" + uuid + "/blobs/" + sha256ABC + "/3/"
	meta := strings.Repeat("m", digest.MaxResourceNameLength-len(wsuffix)-1)
	wname := "i" + wsuffix + meta
	if len(wname) != digest.MaxResourceNameLength {
		t.Fatalf("test bug: len = %d", len(wname))
	}
	if _, err := digest.ParseWriteResourceName(wname); err != nil {
		t.Fatalf("write name of exactly MaxResourceNameLength bytes: %v", err)
	}
	_, err = digest.ParseWriteResourceName(wname + "m")
	wantInvalid(t, err, "longer than")
}

func TestReadWriteName(t *testing.T) {
	for _, tc := range []struct {
		instance string
		d        digest.Digest
		c        repb.Compressor_Value
		read     string
	}{
		{"", shaD, repb.Compressor_IDENTITY, "blobs/" + sha256ABC + "/3"},
		{"main", shaD, repb.Compressor_IDENTITY, "main/blobs/" + sha256ABC + "/3"},
		{"a/b/c", blakeD, repb.Compressor_IDENTITY, "a/b/c/blobs/blake3/" + blake3ABC + "/3"},
		{"", blakeD, repb.Compressor_ZSTD, "compressed-blobs/zstd/blake3/" + blake3ABC + "/3"},
		{"x", shaD0, repb.Compressor_ZSTD, "x/compressed-blobs/zstd/" + sha256Empty + "/0"},
		{"x/y", blakeD0, repb.Compressor_ZSTD, "x/y/compressed-blobs/zstd/blake3/" + blake3Empty + "/0"},
	} {
		if got := digest.ReadName(tc.instance, tc.d, tc.c); got != tc.read {
			t.Errorf("ReadName(%q, %v, %v) = %q, want %q", tc.instance, tc.d, tc.c, got, tc.read)
		}
		rn, err := digest.ParseReadResourceName(tc.read)
		want := digest.ResourceName{Instance: tc.instance, Compressor: tc.c, Digest: tc.d}
		if err != nil || rn != want {
			t.Errorf("ParseReadResourceName(%q) = %+v, %v; want %+v", tc.read, rn, err, want)
		}

		wantWrite := "uploads/" + uuid + "/" + strings.TrimPrefix(tc.read, tc.instance+"/")
		if tc.instance != "" {
			wantWrite = tc.instance + "/" + wantWrite
		}
		w := digest.WriteName(tc.instance, uuid, tc.d, tc.c)
		if w != wantWrite {
			t.Errorf("WriteName = %q, want %q", w, wantWrite)
		}
		wrn, err := digest.ParseWriteResourceName(w)
		want.UploadID = uuid
		if err != nil || wrn != want {
			t.Errorf("ParseWriteResourceName(%q) = %+v, %v; want %+v", w, wrn, err, want)
		}
		// Metadata appended to a write name does not change the result.
		wrn, err = digest.ParseWriteResourceName(w + "/some/metadata")
		if err != nil || wrn != want {
			t.Errorf("ParseWriteResourceName(%q) = %+v, %v; want %+v", w+"/some/metadata", wrn, err, want)
		}
	}
}

func TestReadWriteNameRoundTrip(t *testing.T) {
	instances := []string{"", "main", "a/b/c", "my-instance_1.x", "blob/s", "sha256"}
	var ds []digest.Digest
	for _, fn := range digest.Functions {
		for _, data := range []string{"", "abc", strings.Repeat("x", 1<<16)} {
			ds = append(ds, digest.Compute(fn, []byte(data)))
		}
		ds = append(ds, mustParse(t, fn, sha256ABC, 1<<63-1))
	}
	for _, inst := range instances {
		if err := digest.ValidateInstanceName(inst); err != nil {
			t.Fatalf("ValidateInstanceName(%q): %v", inst, err)
		}
		for _, d := range ds {
			for _, c := range []repb.Compressor_Value{repb.Compressor_IDENTITY, repb.Compressor_ZSTD} {
				rn := digest.ResourceName{Instance: inst, Compressor: c, Digest: d}
				got, err := digest.ParseReadResourceName(digest.ReadName(inst, d, c))
				if err != nil || got != rn {
					t.Errorf("read round trip of %+v = %+v, %v", rn, got, err)
				}
				rn.UploadID = "upload-1"
				got, err = digest.ParseWriteResourceName(digest.WriteName(inst, rn.UploadID, d, c))
				if err != nil || got != rn {
					t.Errorf("write round trip of %+v = %+v, %v", rn, got, err)
				}
			}
		}
	}
}

func TestValidateInstanceName(t *testing.T) {
	for _, ok := range []string{"", "main", "a/b/c", "a.b", "...", "blob", "sha256", "zstd", "Blobs", strings.Repeat("x", digest.MaxResourceNameLength)} {
		if err := digest.ValidateInstanceName(ok); err != nil {
			t.Errorf("ValidateInstanceName(%q) = %v", ok, err)
		}
	}
	for _, tc := range []struct {
		name string
		want string
	}{
		{"/", "empty path segment"},
		{"/a", "empty path segment"},
		{"a/", "empty path segment"},
		{"a//b", "empty path segment"},
		{".", `"."`},
		{"a/.", `"."`},
		{"..", `".."`},
		{"a/../b", `".."`},
		{"a\x00", "NUL"},
		{"blobs", "reserved keyword"},
		{"a/uploads", "reserved keyword"},
		{"actions/b", "reserved keyword"},
		{"actionResults", "reserved keyword"},
		{"operations", "reserved keyword"},
		{"capabilities", "reserved keyword"},
		{"x/compressed-blobs/y", "reserved keyword"},
		{strings.Repeat("x", digest.MaxResourceNameLength+1), "longer than"},
	} {
		wantInvalid(t, digest.ValidateInstanceName(tc.name), tc.want)
	}
}
