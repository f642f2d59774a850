/* A Vulkan layer that removes, from vkCreateDevice's extension list, every device extension the
 * physical device does not support.
 *
 * Why: the sapien 2.2.2 wheel (SIMPLER's renderer) is built with CUDA interop and always asks for
 * VK_KHR_external_semaphore_fd, which Mesa's lavapipe (software Vulkan) lacks, so device creation
 * fails with ErrorExtensionNotPresent. The layer's manifest advertises that extension as a layer
 * device extension (the loader then accepts the request) and this vkCreateDevice drops it before
 * the driver sees it. Nothing else is intercepted. Build: gcc -shared -fPIC -O2 (needs vk_layer.h
 * from libvulkan-dev). Enable: VK_LAYER_PATH=<dir of the manifest> VK_INSTANCE_LAYERS=<layer name>.
 * SELFFLOW_VK_LAYER_VERBOSE=1 prints each dropped extension to stderr.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vk_layer.h>
#include <vulkan/vulkan.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_OBJECTS 64

/* The next layer's entry points, per instance / device (keyed by the loader's dispatch pointer). */
typedef struct { void *key; PFN_vkGetInstanceProcAddr gipa; VkInstance instance; } InstanceEntry;
typedef struct { void *key; PFN_vkGetDeviceProcAddr gdpa; } DeviceEntry;
static InstanceEntry instances[MAX_OBJECTS];
static DeviceEntry devices[MAX_OBJECTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *key_of(const void *handle) { return *(void **)handle; }

static InstanceEntry *find_instance(void *key) {
  for (int i = 0; i < MAX_OBJECTS; i++)
    if (instances[i].key == key) return &instances[i];
  return NULL;
}

static DeviceEntry *find_device(void *key) {
  for (int i = 0; i < MAX_OBJECTS; i++)
    if (devices[i].key == key) return &devices[i];
  return NULL;
}

static VkLayerInstanceCreateInfo *instance_chain(const VkInstanceCreateInfo *info) {
  VkLayerInstanceCreateInfo *c = (VkLayerInstanceCreateInfo *)info->pNext;
  while (c && !(c->sType == VK_STRUCTURE_TYPE_LOADER_INSTANCE_CREATE_INFO && c->function == VK_LAYER_LINK_INFO))
    c = (VkLayerInstanceCreateInfo *)c->pNext;
  return c;
}

static VkLayerDeviceCreateInfo *device_chain(const VkDeviceCreateInfo *info) {
  VkLayerDeviceCreateInfo *c = (VkLayerDeviceCreateInfo *)info->pNext;
  while (c && !(c->sType == VK_STRUCTURE_TYPE_LOADER_DEVICE_CREATE_INFO && c->function == VK_LAYER_LINK_INFO))
    c = (VkLayerDeviceCreateInfo *)c->pNext;
  return c;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateInstance(const VkInstanceCreateInfo *info,
                                                           const VkAllocationCallbacks *alloc, VkInstance *out) {
  VkLayerInstanceCreateInfo *chain = instance_chain(info);
  if (!chain) return VK_ERROR_INITIALIZATION_FAILED;
  PFN_vkGetInstanceProcAddr next_gipa = chain->u.pLayerInfo->pfnNextGetInstanceProcAddr;
  chain->u.pLayerInfo = chain->u.pLayerInfo->pNext;
  PFN_vkCreateInstance next_create = (PFN_vkCreateInstance)next_gipa(VK_NULL_HANDLE, "vkCreateInstance");
  VkResult r = next_create(info, alloc, out);
  if (r != VK_SUCCESS) return r;
  pthread_mutex_lock(&lock);
  InstanceEntry *e = find_instance(NULL);
  if (e) *e = (InstanceEntry){key_of(*out), next_gipa, *out};
  pthread_mutex_unlock(&lock);
  return e ? VK_SUCCESS : VK_ERROR_OUT_OF_HOST_MEMORY;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateDevice(VkPhysicalDevice gpu, const VkDeviceCreateInfo *info,
                                                         const VkAllocationCallbacks *alloc, VkDevice *out) {
  VkLayerDeviceCreateInfo *chain = device_chain(info);
  if (!chain) return VK_ERROR_INITIALIZATION_FAILED;
  PFN_vkGetInstanceProcAddr next_gipa = chain->u.pLayerInfo->pfnNextGetInstanceProcAddr;
  PFN_vkGetDeviceProcAddr next_gdpa = chain->u.pLayerInfo->pfnNextGetDeviceProcAddr;
  chain->u.pLayerInfo = chain->u.pLayerInfo->pNext;

  /* A physical device shares its instance's dispatch pointer. */
  pthread_mutex_lock(&lock);
  InstanceEntry *inst = find_instance(key_of(gpu));
  VkInstance instance = inst ? inst->instance : VK_NULL_HANDLE;
  pthread_mutex_unlock(&lock);
  PFN_vkEnumerateDeviceExtensionProperties enumerate =
      (PFN_vkEnumerateDeviceExtensionProperties)next_gipa(instance, "vkEnumerateDeviceExtensionProperties");
  PFN_vkCreateDevice next_create = (PFN_vkCreateDevice)next_gipa(instance, "vkCreateDevice");
  if (!enumerate || !next_create) return VK_ERROR_INITIALIZATION_FAILED;

  uint32_t n_supported = 0;
  enumerate(gpu, NULL, &n_supported, NULL);
  VkExtensionProperties *supported = calloc(n_supported ? n_supported : 1, sizeof(*supported));
  const char **kept = calloc(info->enabledExtensionCount ? info->enabledExtensionCount : 1, sizeof(char *));
  if (!supported || !kept) { free(supported); free(kept); return VK_ERROR_OUT_OF_HOST_MEMORY; }
  enumerate(gpu, NULL, &n_supported, supported);
  uint32_t n_kept = 0;
  for (uint32_t i = 0; i < info->enabledExtensionCount; i++) {
    const char *name = info->ppEnabledExtensionNames[i];
    int found = 0;
    for (uint32_t j = 0; j < n_supported && !found; j++) found = strcmp(name, supported[j].extensionName) == 0;
    if (found) kept[n_kept++] = name;
    else if (getenv("SELFFLOW_VK_LAYER_VERBOSE")) fprintf(stderr, "[vk layer] dropped device extension %s\n", name);
  }
  VkDeviceCreateInfo filtered = *info;
  filtered.enabledExtensionCount = n_kept;
  filtered.ppEnabledExtensionNames = kept;
  VkResult r = next_create(gpu, &filtered, alloc, out);
  free(supported);
  free(kept);
  if (r != VK_SUCCESS) return r;
  pthread_mutex_lock(&lock);
  DeviceEntry *d = find_device(NULL);
  if (d) *d = (DeviceEntry){key_of(*out), next_gdpa};
  pthread_mutex_unlock(&lock);
  return d ? VK_SUCCESS : VK_ERROR_OUT_OF_HOST_MEMORY;
}

static VKAPI_ATTR void VKAPI_CALL layer_DestroyInstance(VkInstance instance, const VkAllocationCallbacks *alloc) {
  pthread_mutex_lock(&lock);
  InstanceEntry *e = find_instance(key_of(instance));
  PFN_vkGetInstanceProcAddr gipa = e ? e->gipa : NULL;
  if (e) e->key = NULL;
  pthread_mutex_unlock(&lock);
  if (gipa) ((PFN_vkDestroyInstance)gipa(instance, "vkDestroyInstance"))(instance, alloc);
}

static VKAPI_ATTR void VKAPI_CALL layer_DestroyDevice(VkDevice device, const VkAllocationCallbacks *alloc) {
  pthread_mutex_lock(&lock);
  DeviceEntry *e = find_device(key_of(device));
  PFN_vkGetDeviceProcAddr gdpa = e ? e->gdpa : NULL;
  if (e) e->key = NULL;
  pthread_mutex_unlock(&lock);
  if (gdpa) ((PFN_vkDestroyDevice)gdpa(device, "vkDestroyDevice"))(device, alloc);
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device, const char *name) {
  if (!strcmp(name, "vkGetDeviceProcAddr")) return (PFN_vkVoidFunction)vkGetDeviceProcAddr;
  if (!strcmp(name, "vkDestroyDevice")) return (PFN_vkVoidFunction)layer_DestroyDevice;
  pthread_mutex_lock(&lock);
  DeviceEntry *e = find_device(key_of(device));
  PFN_vkGetDeviceProcAddr gdpa = e ? e->gdpa : NULL;
  pthread_mutex_unlock(&lock);
  return gdpa ? gdpa(device, name) : NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetInstanceProcAddr(VkInstance instance, const char *name) {
  if (!strcmp(name, "vkGetInstanceProcAddr")) return (PFN_vkVoidFunction)vkGetInstanceProcAddr;
  if (!strcmp(name, "vkCreateInstance")) return (PFN_vkVoidFunction)layer_CreateInstance;
  if (!strcmp(name, "vkDestroyInstance")) return (PFN_vkVoidFunction)layer_DestroyInstance;
  if (!strcmp(name, "vkCreateDevice")) return (PFN_vkVoidFunction)layer_CreateDevice;
  if (!strcmp(name, "vkGetDeviceProcAddr")) return (PFN_vkVoidFunction)vkGetDeviceProcAddr;
  if (!strcmp(name, "vkDestroyDevice")) return (PFN_vkVoidFunction)layer_DestroyDevice;
  if (instance == VK_NULL_HANDLE) return NULL;
  pthread_mutex_lock(&lock);
  InstanceEntry *e = find_instance(key_of(instance));
  PFN_vkGetInstanceProcAddr gipa = e ? e->gipa : NULL;
  pthread_mutex_unlock(&lock);
  return gipa ? gipa(instance, name) : NULL;
}
