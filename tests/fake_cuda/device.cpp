// A CUDA device that does nothing, for PyTorch's fake tensors on `cuda` in a CPU-only build (tests/test_fake_cuda.py).
//
// A CPU-only build has no CUDA device guard (the Python bindings of indexing, `to` and `contiguous` take one, and so
// does autograd for every CUDA tensor it differentiates) and CUDA hooks that say "no CUDA" (autograd asks them for
// the accelerator of its streams). This registers a guard with one device, index 0, a single default stream and
// events that do nothing, and hooks that say CUDA is there. Loaded before torch is imported, in a process of its own:
// nothing ever runs a kernel on it, fake tensors only.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::Stream;
constexpr auto CUDA = c10::DeviceType::CUDA;

struct FakeCUDAGuard final : c10::impl::NoOpDeviceGuardImpl<CUDA> {
  Device exchangeDevice(Device) const override { return Device(CUDA, 0); }
  Device getDevice() const override { return Device(CUDA, 0); }
  Stream getStream(Device) const noexcept override { return Stream(Stream::DEFAULT, Device(CUDA, 0)); }
  Stream exchangeStream(Stream) const noexcept override { return Stream(Stream::DEFAULT, Device(CUDA, 0)); }
  void record(void**, const Stream&, const DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
};

struct FakeCUDAHooks final : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  DeviceIndex deviceCount() const override { return 1; }
  DeviceIndex getCurrentDevice() const override { return 0; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
};

}  // namespace

C10_REGISTER_GUARD_IMPL(CUDA, FakeCUDAGuard);

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks);  // the name getCUDAHooks() creates
}
