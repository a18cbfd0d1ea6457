package grpcservers_test

import (
	"bytes"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// acFixture is an action result and the blobs it references.
type acFixture struct {
	action  *repb.Digest
	result  *repb.ActionResult
	blobs   map[string][]byte // by role
	order   []string          // roles, in upload order
	treeDir *repb.Directory
}

// newACFixture builds a result with stdout, stderr, two output files and an
// output directory whose Tree has files in its root and in a child. salt
// makes every blob unique.
func newACFixture(t testing.TB, fc fnCase, salt string) *acFixture {
	t.Helper()
	f := &acFixture{blobs: map[string][]byte{}}
	add := func(role string, data []byte) *repb.Digest {
		f.blobs[role] = data
		f.order = append(f.order, role)
		return fc.pd(data)
	}
	stdout := add("stdout", []byte("compiling "+salt+"\n"))
	stderr := add("stderr", []byte("warning: "+salt+"\n"))
	out1 := add("output file", []byte("object code "+salt))
	out2 := add("second output file", randBytes(uint64(len(salt))+uint64(fc.fn), 2000))
	rootFile := add("file in tree root", []byte("generated header "+salt))
	childFile := add("file in tree child", []byte("generated source "+salt))
	child := &repb.Directory{Files: []*repb.FileNode{{Name: "gen.c", Digest: childFile, IsExecutable: true}}}
	childData, err := proto.MarshalOptions{Deterministic: true}.Marshal(child)
	if err != nil {
		t.Fatal(err)
	}
	root := &repb.Directory{
		Files:       []*repb.FileNode{{Name: "gen.h", Digest: rootFile}},
		Directories: []*repb.DirectoryNode{{Name: "sub", Digest: fc.pd(childData)}},
	}
	f.treeDir = root
	treeData, err := proto.MarshalOptions{Deterministic: true}.Marshal(&repb.Tree{Root: root, Children: []*repb.Directory{child}})
	if err != nil {
		t.Fatal(err)
	}
	tree := add("output directory tree", treeData)
	f.action = fc.pd([]byte("action " + salt))
	f.result = &repb.ActionResult{
		ExitCode:     0,
		StdoutDigest: stdout,
		StderrDigest: stderr,
		OutputFiles: []*repb.OutputFile{
			{Path: "out/main.o", Digest: out1},
			{Path: "out/data.bin", Digest: out2, IsExecutable: true},
		},
		OutputDirectories: []*repb.OutputDirectory{{Path: "out/gen", TreeDigest: tree}},
		OutputSymlinks:    []*repb.OutputSymlink{{Path: "out/link", Target: "main.o"}},
		ExecutionMetadata: &repb.ExecutedActionMetadata{Worker: "test " + salt},
	}
	return f
}

func (e *env) getAR(t testing.TB, instance string, fc fnCase, req *repb.GetActionResultRequest) (*repb.ActionResult, error) {
	t.Helper()
	req.InstanceName = instance
	req.DigestFunction = fc.proto
	return e.ac.GetActionResult(testCtx(t), req)
}

func (e *env) updateAR(t testing.TB, instance string, fc fnCase, action *repb.Digest, res *repb.ActionResult) {
	t.Helper()
	got, err := e.ac.UpdateActionResult(testCtx(t), &repb.UpdateActionResultRequest{InstanceName: instance, DigestFunction: fc.proto, ActionDigest: action, ActionResult: res})
	if err != nil {
		t.Fatalf("UpdateActionResult: %v", err)
	}
	if !proto.Equal(got, res) {
		t.Fatalf("UpdateActionResult returned %v, want %v", got, res)
	}
}

func TestActionCacheRoundTrip(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		for _, instance := range []string{"", "a/b"} {
			f := newACFixture(t, fc, "round trip "+instance)
			_, err := e.getAR(t, instance, fc, &repb.GetActionResultRequest{ActionDigest: f.action})
			wantCode(t, err, codes.NotFound, "GetActionResult before UpdateActionResult")

			var all [][]byte
			for _, role := range f.order {
				all = append(all, f.blobs[role])
			}
			e.batchUpload(t, instance, fc, all...)
			e.updateAR(t, instance, fc, f.action, f.result)
			got, err := e.getAR(t, instance, fc, &repb.GetActionResultRequest{ActionDigest: f.action})
			if err != nil {
				t.Fatalf("GetActionResult: %v", err)
			}
			if !proto.Equal(got, f.result) {
				t.Fatalf("GetActionResult = %v, want %v", got, f.result)
			}

			// Inlining, as requested.
			got, err = e.getAR(t, instance, fc, &repb.GetActionResultRequest{
				ActionDigest:      f.action,
				InlineStdout:      true,
				InlineOutputFiles: []string{"out/data.bin", "not/an/output"},
			})
			if err != nil {
				t.Fatalf("GetActionResult with inlining: %v", err)
			}
			if !bytes.Equal(got.StdoutRaw, f.blobs["stdout"]) {
				t.Errorf("stdout_raw = %q, want %q", got.StdoutRaw, f.blobs["stdout"])
			}
			if len(got.StderrRaw) != 0 {
				t.Errorf("stderr inlined without inline_stderr")
			}
			if len(got.OutputFiles[0].Contents) != 0 {
				t.Errorf("out/main.o inlined without being requested")
			}
			if !bytes.Equal(got.OutputFiles[1].Contents, f.blobs["second output file"]) {
				t.Errorf("out/data.bin contents = %d bytes, want %d", len(got.OutputFiles[1].Contents), len(f.blobs["second output file"]))
			}
			// Inlining adds contents but keeps the digests.
			if !proto.Equal(got.StdoutDigest, f.result.StdoutDigest) || !proto.Equal(got.OutputFiles[1].Digest, f.result.OutputFiles[1].Digest) {
				t.Errorf("inlining changed digests")
			}
			got, err = e.getAR(t, instance, fc, &repb.GetActionResultRequest{ActionDigest: f.action, InlineStderr: true, InlineOutputFiles: []string{"out/main.o"}})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.StderrRaw, f.blobs["stderr"]) || len(got.StdoutRaw) != 0 || !bytes.Equal(got.OutputFiles[0].Contents, f.blobs["output file"]) {
				t.Errorf("inline_stderr + inline_output_files: got %v", got)
			}

			// An update replaces the result.
			newer := proto.Clone(f.result).(*repb.ActionResult)
			newer.ExitCode = 3
			e.updateAR(t, instance, fc, f.action, newer)
			got, err = e.getAR(t, instance, fc, &repb.GetActionResultRequest{ActionDigest: f.action})
			if err != nil || got.ExitCode != 3 {
				t.Fatalf("GetActionResult after a second update: %v, %v", got, err)
			}
		}
	})
}

func TestActionCacheCompleteness(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		roles := newACFixture(t, fc, "").order
		for _, missing := range roles {
			t.Run(missing, func(t *testing.T) {
				f := newACFixture(t, fc, "completeness "+missing)
				var others [][]byte
				for _, role := range f.order {
					if role != missing {
						others = append(others, f.blobs[role])
					}
				}
				e.batchUpload(t, "", fc, others...)
				e.updateAR(t, "", fc, f.action, f.result)
				_, err := e.getAR(t, "", fc, &repb.GetActionResultRequest{ActionDigest: f.action})
				wantCode(t, err, codes.NotFound, "GetActionResult with the "+missing+" missing from the CAS")
				_, err = e.getAR(t, "", fc, &repb.GetActionResultRequest{ActionDigest: f.action, InlineStdout: true, InlineOutputFiles: []string{"out/main.o"}})
				wantCode(t, err, codes.NotFound, "GetActionResult with inlining and the "+missing+" missing from the CAS")

				e.batchUpload(t, "", fc, f.blobs[missing])
				got, err := e.getAR(t, "", fc, &repb.GetActionResultRequest{ActionDigest: f.action})
				if err != nil {
					t.Fatalf("GetActionResult once the %s is uploaded: %v", missing, err)
				}
				if !proto.Equal(got, f.result) {
					t.Fatalf("GetActionResult = %v, want %v", got, f.result)
				}
			})
		}

		// Empty stdout and an empty output file need no upload.
		action := fc.pd([]byte("action with empty outputs"))
		res := &repb.ActionResult{StdoutDigest: fc.pd(nil), OutputFiles: []*repb.OutputFile{{Path: "empty", Digest: fc.pd(nil)}}}
		e.updateAR(t, "", fc, action, res)
		got, err := e.getAR(t, "", fc, &repb.GetActionResultRequest{ActionDigest: action, InlineStdout: true, InlineOutputFiles: []string{"empty"}})
		if err != nil {
			t.Fatalf("GetActionResult with empty outputs: %v", err)
		}
		if len(got.StdoutRaw) != 0 || len(got.OutputFiles[0].Contents) != 0 {
			t.Fatalf("empty outputs inlined as %v", got)
		}

		// A tree blob that is not a Tree is a miss.
		junk := []byte("this is not a Tree message \xff\xff\xff")
		e.batchUpload(t, "", fc, junk)
		action = fc.pd([]byte("action with a junk tree"))
		e.updateAR(t, "", fc, action, &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "d", TreeDigest: fc.pd(junk)}}})
		_, err = e.getAR(t, "", fc, &repb.GetActionResultRequest{ActionDigest: action})
		wantCode(t, err, codes.NotFound, "GetActionResult with an unparsable tree")
	})
}

func TestActionCacheLargeTree(t *testing.T) {
	t.Parallel()
	// An output directory Tree larger than a batch must be read through.
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		file := []byte("shared file " + fc.name)
		e.batchUpload(t, "", fc, file)
		tree := &repb.Tree{Root: &repb.Directory{}}
		long := strings.Repeat("x", 600)
		for i := range 7000 {
			tree.Root.Files = append(tree.Root.Files, &repb.FileNode{Name: itoa(i) + "-" + long, Digest: fc.pd(file)})
		}
		data, err := proto.MarshalOptions{Deterministic: true}.Marshal(tree)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) <= 4<<20 {
			t.Fatalf("tree is only %d bytes", len(data))
		}
		td := fc.digest(data)
		if _, err := e.bsWrite(testCtx(t), writeName("", newUUID(), "blobs", fc, td), data, 0, 1<<20); err != nil {
			t.Fatal(err)
		}
		action := fc.pd([]byte("action with a large tree"))
		res := &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "big", TreeDigest: td.Proto()}}}
		e.updateAR(t, "", fc, action, res)
		if _, err := e.getAR(t, "", fc, &repb.GetActionResultRequest{ActionDigest: action}); err != nil {
			t.Fatalf("GetActionResult with a %d-byte tree: %v", len(data), err)
		}
	})
}

func itoa(i int) string {
	var b [20]byte
	n := len(b)
	for {
		n--
		b[n] = byte('0' + i%10)
		i /= 10
		if i == 0 {
			return string(b[n:])
		}
	}
}

func TestActionCacheKeys(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sha, b3 := fnCases[0], fnCases[1]
	action := []byte("an action")
	res := &repb.ActionResult{ExitCode: 7}
	e.updateAR(t, "", b3, b3.pd(action), res)
	// The same hash under the other function is another key.
	_, err := e.getAR(t, "", sha, &repb.GetActionResultRequest{ActionDigest: &repb.Digest{Hash: b3.pd(action).Hash, SizeBytes: int64(len(action))}})
	wantCode(t, err, codes.NotFound, "GetActionResult of a BLAKE3 key as SHA-256")
	got, err := e.getAR(t, "", b3, &repb.GetActionResultRequest{ActionDigest: b3.pd(action)})
	if err != nil || got.ExitCode != 7 {
		t.Fatalf("GetActionResult: %v, %v", got, err)
	}

	// Invalid updates.
	ctx := testCtx(t)
	_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: sha.pd(action)})
	wantCode(t, err, codes.InvalidArgument, "UpdateActionResult without action_result")
	_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: sha.pd(action), ActionResult: &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "x"}}}})
	wantCode(t, err, codes.InvalidArgument, "UpdateActionResult with an output file without digest")
	_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: sha.pd(action), ActionResult: &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "x"}}}})
	wantCode(t, err, codes.InvalidArgument, "UpdateActionResult with an output directory without tree_digest")
	_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: sha.pd(action), ActionResult: &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "x", Digest: &repb.Digest{Hash: "abc", SizeBytes: 1}}}}})
	wantCode(t, err, codes.InvalidArgument, "UpdateActionResult with a malformed output file digest")
	_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{
		ActionDigest:   sha.pd(action),
		DigestFunction: repb.DigestFunction_BLAKE3,
		ActionResult:   &repb.ActionResult{StderrDigest: &repb.Digest{Hash: sha.pd(action).Hash, SizeBytes: -5}},
	})
	wantCode(t, err, codes.InvalidArgument, "UpdateActionResult with a negative stderr size")
	// Nothing was stored for the SHA-256 key.
	_, err = e.getAR(t, "", sha, &repb.GetActionResultRequest{ActionDigest: sha.pd(action)})
	wantCode(t, err, codes.NotFound, "GetActionResult after refused updates")
}
