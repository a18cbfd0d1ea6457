package grpcservers_test

import (
	"slices"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

func TestGetCapabilities(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, instance := range []string{"", "a/b"} {
		caps, err := e.caps.GetCapabilities(testCtx(t), &repb.GetCapabilitiesRequest{InstanceName: instance})
		if err != nil {
			t.Fatalf("GetCapabilities(%q): %v", instance, err)
		}
		cc := caps.GetCacheCapabilities()
		if cc == nil {
			t.Fatalf("GetCapabilities(%q): no cache capabilities", instance)
		}
		if want := []repb.DigestFunction_Value{repb.DigestFunction_SHA256, repb.DigestFunction_BLAKE3}; !slices.Equal(cc.DigestFunctions, want) {
			t.Errorf("digest_functions = %v, want %v", cc.DigestFunctions, want)
		}
		if cc.MaxBatchTotalSizeBytes != 4<<20 {
			t.Errorf("max_batch_total_size_bytes = %d, want %d", cc.MaxBatchTotalSizeBytes, 4<<20)
		}
		if !slices.Contains(cc.SupportedCompressors, repb.Compressor_ZSTD) {
			t.Errorf("supported_compressors = %v, want ZSTD", cc.SupportedCompressors)
		}
		if !slices.Contains(cc.SupportedBatchUpdateCompressors, repb.Compressor_ZSTD) {
			t.Errorf("supported_batch_update_compressors = %v, want ZSTD", cc.SupportedBatchUpdateCompressors)
		}
		if !cc.GetActionCacheUpdateCapabilities().GetUpdateEnabled() {
			t.Errorf("action_cache_update_capabilities.update_enabled is false")
		}
		if cc.SymlinkAbsolutePathStrategy != repb.SymlinkAbsolutePathStrategy_ALLOWED {
			t.Errorf("symlink_absolute_path_strategy = %v, want ALLOWED", cc.SymlinkAbsolutePathStrategy)
		}
		lo, hi := caps.GetLowApiVersion(), caps.GetHighApiVersion()
		if lo.GetMajor() != 2 || lo.GetMinor() != 0 || lo.GetPatch() != 0 || lo.GetPrerelease() != "" {
			t.Errorf("low_api_version = %v, want 2.0", lo)
		}
		if hi.GetMajor() != 2 || hi.GetMinor() != 11 || hi.GetPatch() != 0 || hi.GetPrerelease() != "" {
			t.Errorf("high_api_version = %v, want 2.11", hi)
		}
		if caps.ExecutionCapabilities != nil {
			t.Errorf("storage-only server announces execution: %v", caps.ExecutionCapabilities)
		}
	}
}
